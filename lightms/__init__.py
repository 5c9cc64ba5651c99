"""lightms: a PyTorch-Lightning-style trainer for MindSpore with compiled steps."""

from lightms._mindspore import compiled_graph_count  # first: quiets MindSpore's logs before it loads
from lightms.distributed.environment import serve_if_scheduler

serve_if_scheduler()  # msrun runs the script a third time as its scheduler: it only needs to serve the workers

from lightms.autodiff import per_sample_grads  # noqa: E402
from lightms.distributed import DDPStrategy
from lightms.module import LightningCell, LightningDataModule
from lightms.trainer import Trainer, seed_everything

__version__ = "0.1.0"

__all__ = ["DDPStrategy", "LightningCell", "LightningDataModule", "Trainer", "seed_everything", "compiled_graph_count",
           "per_sample_grads", "__version__"]
