"""Automatic-differentiation helpers on top of MindSpore: gradient clipping, per-example gradients."""
