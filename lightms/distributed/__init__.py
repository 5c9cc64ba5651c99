"""Data-parallel training on MindSpore's msrun: the cluster environment, sharding, gradient reduction."""

from lightms.distributed.environment import ClusterEnvironment
from lightms.distributed.strategy import DDPStrategy

__all__ = ["ClusterEnvironment", "DDPStrategy"]
