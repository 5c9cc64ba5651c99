"""The trainer and its loop: `Trainer`, data adaptation, logged-value store, argument checks."""

from lightms.trainer.seed import seed_everything
from lightms.trainer.trainer import Trainer

__all__ = ["Trainer", "seed_everything"]
