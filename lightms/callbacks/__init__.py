"""Callbacks, one per module: the base class and the built-ins."""

from lightms.callbacks.callback import Callback
from lightms.callbacks.model_checkpoint import ModelCheckpoint
from lightms.callbacks.progress import TQDMProgressBar

__all__ = ["Callback", "ModelCheckpoint", "TQDMProgressBar"]
