"""Mixed and half precision: `Trainer(precision=...)` mapped onto `mindspore.amp`."""

from lightms.precision.precision import PRECISIONS, Precision, resolve_precision

__all__ = ["PRECISIONS", "Precision", "resolve_precision"]
