"""Loggers, one per module."""

from lightms.loggers.logger import Logger
from lightms.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "TensorBoardLogger"]
