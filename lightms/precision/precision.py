"""`Trainer(precision=...)`: which dtype the module computes in, and loss scaling.

Lightning's names map onto `mindspore.amp`:

* "32" / "32-true" / "O0": float32 throughout (the default).
* "16-mixed" / "bf16-mixed": `auto_mixed_precision(step_hook, "auto", dtype)`,
  MindSpore's per-operator autocast around each step hook: matrix products and
  convolutions run in half precision, reductions, softmax and losses in float32; the
  module and its parameters stay float32 (the master weights). "16-mixed" adds
  dynamic loss scaling in the compiled step.
* "16-true" / "bf16-true": the parameters themselves become half precision and the
  module computes in it (no master weights, no loss scaling), as Lightning's.
* "O1" / "O2" / "O3": MindSpore's own levels, applied to each sub-cell of the module
  (a LightningCell's own methods stay float32 code), float16, with dynamic loss
  scaling for O2 only, as `mindspore.train.Model` defaults it. O1 rewrites the
  sub-cells' source; MindSpore writes that code to `./rewritten_network/` and
  compiles from it for the life of the process, so lightms has it written into a
  temporary folder (removed at exit), not the working directory.

Whether the running backend has the kernels is checked by running them once
(`check_backend`), not assumed from a table.
"""

import atexit
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Tensor, amp, nn, ops

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "O0", "O1", "O2", "O3")
_ALIASES = {32: "32-true", "32": "32-true", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed", "O0": "32-true"}

# Dynamic loss scaling as `mindspore.amp.DynamicLossScaler` defaults it in `Model`.
INITIAL_SCALE = 2.0 ** 16
SCALE_FACTOR = 2
SCALE_WINDOW = 2000


@dataclass(frozen=True)
class Precision:
    """How a run computes.

    Attributes:
        name: The value given to the Trainer.
        dtype: The half dtype (float16 or bfloat16), or None for float32.
        amp_level: "auto" (per-operator autocast), "O1".."O3", "true" (half parameters) or "O0".
        loss_scaling: Whether the step scales the loss dynamically.
    """

    name: str
    dtype: Optional[object]
    amp_level: str
    loss_scaling: bool

    @property
    def is_float32(self) -> bool:
        """Whether nothing changes (float32 throughout)."""
        return self.dtype is None

    def loss_scaler(self) -> Optional[amp.DynamicLossScaler]:
        """A fresh dynamic loss scaler with lightms-prefixed parameter names, or None."""
        if not self.loss_scaling:
            return None
        scaler = amp.DynamicLossScaler(INITIAL_SCALE, SCALE_FACTOR, SCALE_WINDOW)
        scaler.scale_value.name = "lightms.loss_scale.scale_value"  # unique names inside the graph
        scaler.counter.name = "lightms.loss_scale.counter"
        return scaler

    def autocast(self, hook):
        """Wraps a step hook so its operators autocast ("16-mixed", "bf16-mixed"); else returns it as is.

        `mindspore.amp.auto_mixed_precision(function, "auto")` applies to everything the
        function runs, `self(x)` and direct sub-cell calls (`self.net(x)`) alike, eagerly
        and compiled. It marks the function object it is given, so it gets a wrapper of its own.
        """
        if self.amp_level != "auto":
            return hook

        def run_hook(batch, batch_idx):
            return hook(batch, batch_idx)

        return amp.auto_mixed_precision(run_hook, "auto", self.dtype)

    def apply(self, module: nn.Cell) -> None:
        """Converts `module` for the levels that change it ("-true", "O1".."O3"), in place.

        Parameter names do not change. Applied once: a module that already has this
        precision is left alone. "-mixed" leaves the module as it is (see `autocast`).

        Raises:
            ValueError: If the module was converted for another precision before.
        """
        done = getattr(module, "_lightms_precision", None)
        if done == self.name or (done is None and self.amp_level in ("O0", "auto")):
            return
        if done is not None:
            raise ValueError(f"This module was already converted for Trainer(precision={done!r}); build a fresh "
                             f"module for precision={self.name!r}.")
        if self.amp_level == "true":
            module.to_float(self.dtype)
            for parameter in module.get_parameters():
                if parameter.dtype in (ms.float32, ms.float64, ms.float16, ms.bfloat16):  # not integer buffers
                    parameter.set_dtype(self.dtype)
        else:
            # MindSpore wraps the cell it converts (O2/O3 in an output cast, O1 in a rewritten copy); convert the
            # sub-cells instead, so the LightningCell itself and its hooks stay as they are.
            with _rewrite_folder(self.amp_level == "O1"):
                for name, cell in list(module.name_cells().items()):
                    module._cells[name] = self._convert_keeping_names(name, cell)
        object.__setattr__(module, "_lightms_precision", self.name)


    def _convert_keeping_names(self, attribute: str, cell: nn.Cell) -> nn.Cell:
        """Converts a sub-cell at an "O" level; its parameters keep their names (O1's rewrite drops the prefix).

        Raises:
            RuntimeError: If the names cannot be restored (checkpoints would not load).
        """
        names = [p.name for p in cell.get_parameters()]
        converted = amp.auto_mixed_precision(cell, self.amp_level, self.dtype)
        return _restore_names(attribute, names, converted)


def _restore_names(attribute: str, names, converted: nn.Cell) -> nn.Cell:
    """Renames `converted`'s parameters back to `names` by adding the `attribute.` prefix they lost.

    Raises:
        RuntimeError: If that does not give back `names`.
    """
    if [p.name for p in converted.get_parameters()] != names:
        converted.update_parameters_name(f"{attribute}.")
    renamed = [p.name for p in converted.get_parameters()]
    if renamed != names:
        raise RuntimeError(f"mindspore.amp renamed the parameters of sub-cell {attribute!r} ({names[:2]} -> "
                           f"{renamed[:2]}); lightms cannot restore them, so checkpoints would not load.")
    return converted


@contextmanager
def _rewrite_folder(needed: bool) -> Iterator[None]:
    """Runs in a temporary folder that lives until the process exits (amp O1 compiles from files it writes)."""
    if not needed:
        yield
        return
    folder = tempfile.mkdtemp(prefix="lightms-amp-O1-")
    atexit.register(shutil.rmtree, folder, True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def warn_half_optimizer(precision: Precision, optimizer) -> None:
    """Warns when "16-true" makes the optimizer's epsilon round to zero (float16's smallest value is 6e-8).

    With half-precision parameters the optimizer state is half too; Adam's default
    eps=1e-8 becomes 0 and updates of small-gradient weights blow up or stall.
    """
    if precision.amp_level != "true" or precision.dtype != ms.float16:
        return
    values = [getattr(optimizer, "eps", None)]
    values += [group.get("eps") for group in getattr(optimizer, "param_groups", [])]
    for eps in values:
        if hasattr(eps, "asnumpy"):  # nn.Adam keeps eps as a Tensor (a host read, once per fit)
            eps = float(eps.asnumpy())
        if isinstance(eps, float) and eps > 0 and float(np.float16(eps)) == 0.0:
            warnings.warn(f"Trainer(precision={precision.name!r}): {type(optimizer).__name__}'s eps={eps:g} is 0 in "
                          "float16, which the optimizer state now uses; training degrades (the digits example "
                          "loses 18 points). Pass eps=1e-4 or use precision='16-mixed'.", stacklevel=4)
            return


def resolve_precision(value) -> Precision:
    """Reads `Trainer(precision=...)`.

    Raises:
        ValueError: For an unknown precision, listing the accepted ones.
    """
    key = _ALIASES.get(value, value)
    if not isinstance(key, str) or key not in PRECISIONS:
        raise ValueError(f"Trainer(precision={value!r}) is not a precision lightms knows; use one of "
                         f"{', '.join(repr(p) for p in PRECISIONS)}.")
    if key in ("32", "32-true"):
        return Precision(str(value), None, "O0", False)
    half = ms.bfloat16 if key.startswith("bf16") else ms.float16
    if key.endswith("-mixed"):
        return Precision(key, half, "auto", half == ms.float16)
    if key.endswith("-true"):
        return Precision(key, half, "true", False)
    return Precision(key, ms.float16, key, key == "O2")


def check_backend(precision: Precision) -> None:
    """Runs a matrix product and a convolution in the precision's dtype once.

    Raises:
        RuntimeError: If the running MindSpore backend has no such kernels, naming the
            backend and what to use instead.
    """
    if precision.is_float32:
        return
    dtype = precision.dtype
    try:
        a = Tensor(np.ones((2, 2), np.float32)).astype(dtype)
        ops.matmul(a, a).asnumpy()
        image = Tensor(np.ones((1, 1, 4, 4), np.float32)).astype(dtype)
        kernel = Tensor(np.ones((1, 1, 3, 3), np.float32)).astype(dtype)
        ops.conv2d(image, kernel).asnumpy()
    except (RuntimeError, TypeError, ValueError) as error:
        backend = ms.get_context("device_target")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"Trainer(precision={precision.name!r}) needs {dtype} matrix products and convolutions, which the "
            f"MindSpore {ms.__version__} {backend} backend does not have (it said: {first_line}). Use "
            f"precision='32-true' or '16-mixed' on {backend}; see the precision table in the README.") from None
