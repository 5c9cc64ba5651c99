"""Automatic-differentiation helpers on top of MindSpore: gradient clipping, per-example gradients."""

from lightms.autodiff.per_sample import per_sample_grads

__all__ = ["per_sample_grads"]
