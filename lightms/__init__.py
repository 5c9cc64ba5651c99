"""lightms: a PyTorch-Lightning-style trainer for MindSpore with compiled steps."""

from lightms._mindspore import compiled_graph_count  # first: quiets MindSpore's logs before it loads
from lightms.autodiff import per_sample_grads
from lightms.module import LightningCell, LightningDataModule
from lightms.trainer import Trainer, seed_everything

__version__ = "0.1.0"

__all__ = ["LightningCell", "LightningDataModule", "Trainer", "seed_everything", "compiled_graph_count",
           "per_sample_grads", "__version__"]
