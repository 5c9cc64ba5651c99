"""Callbacks, one per module: the base class and the built-ins."""

from lightms.callbacks.callback import Callback
from lightms.callbacks.early_stopping import EarlyStopping
from lightms.callbacks.lambda_callback import LambdaCallback
from lightms.callbacks.lr_monitor import LearningRateMonitor
from lightms.callbacks.model_checkpoint import ModelCheckpoint
from lightms.callbacks.model_summary import ModelSummary
from lightms.callbacks.progress import TQDMProgressBar
from lightms.callbacks.timer import Timer

__all__ = ["Callback", "EarlyStopping", "LambdaCallback", "LearningRateMonitor", "ModelCheckpoint",
           "ModelSummary", "TQDMProgressBar", "Timer"]
