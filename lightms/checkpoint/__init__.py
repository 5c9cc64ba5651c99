"""Checkpointing: file format, atomic writes, and restoring a run."""

from lightms.checkpoint.io import read_checkpoint, write_checkpoint

__all__ = ["read_checkpoint", "write_checkpoint"]
