"""Loggers, one per module."""

from lightms.loggers.csv import CSVLogger
from lightms.loggers.logger import Logger
from lightms.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]
