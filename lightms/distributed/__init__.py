"""Data-parallel training on MindSpore's msrun: the cluster environment, sharding, gradient reduction."""

from lightms.distributed.environment import ClusterEnvironment

__all__ = ["ClusterEnvironment"]
