"""`LightningCell`: the module API, a `mindspore.nn.Cell` with Lightning's hooks."""

import inspect
import os
from typing import Any, Dict, Mapping

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiet import first)
from mindspore import nn

from lightms.autodiff.clipping import check_clip_arguments, clip_by_norm, clip_by_value
from lightms.module.hparams import AttributeDict, collect_init_arguments


class StepScope:
    """While a step hook runs: `self.log` writes to a log target, and the counters are the device's.

    The three attributes it sets are the module's own (`LightningCell.__init__`); a run's
    `ModuleBinding` hands these scopes out. A class rather than a generator-based context
    manager: it is entered around every compiled step, where each Python call costs host time.
    """

    __slots__ = ("module", "hook", "log_target")

    def __init__(self, module, hook: str, log_target):
        self.module, self.hook, self.log_target = module, hook, log_target

    def __enter__(self) -> None:
        module = self.module
        object.__setattr__(module, "_lightms_hook", self.hook)
        object.__setattr__(module, "_lightms_log_target", self.log_target)
        object.__setattr__(module, "_lightms_in_step", True)

    def __exit__(self, *exc_info) -> None:
        module = self.module
        object.__setattr__(module, "_lightms_in_step", False)
        object.__setattr__(module, "_lightms_hook", None)
        object.__setattr__(module, "_lightms_log_target", None)


def _check_gradients_fit(module, optimizer, grads) -> None:
    """In the dry run: refuses gradients that are not `optimizer`'s, before MindSpore's HyperMap error.

    Raises:
        ValueError: Naming training_step and the optimizer's position.
    """
    optimizers = module._lightms_optimizers or ()
    position = next((i for i, o in enumerate(optimizers) if o is optimizer), None)
    where = f"{type(module).__name__}.training_step: self.optimizer_step(optimizers()[{position}], grads)"
    parameters = tuple(optimizer.parameters)
    grads = tuple(grads)
    shapes = [tuple(g.shape) for g in grads]
    wanted = [tuple(p.shape) for p in parameters]
    if shapes != wanted:
        raise ValueError(f"{where}: the gradients do not fit the optimizer's parameters ({len(grads)} gradients of "
                         f"shapes {shapes}, for {len(parameters)} parameters of shapes {wanted}); take them with "
                         "self.value_and_grad(fn, that optimizer).")


class LightningCell(nn.Cell):
    """A `mindspore.nn.Cell` organised the way a LightningModule is.

    Write the forward pass in `construct`, the work of one batch in
    `training_step` / `validation_step` / `test_step` / `predict_step`, and return an
    optimizer from `configure_optimizers`. `lightms.Trainer` compiles the steps into
    MindSpore graphs; `self(x)` works inside them.

    Inside a step, `self.current_epoch` and `self.global_step` are device scalars
    that the compiled graph reads live; in the `on_*` hooks they are Python ints.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Plain attributes: Cell.__setattr__ would register Cells and Parameters as children.
        object.__setattr__(self, "_trainer", None)
        object.__setattr__(self, "_lightms_hook", None)
        object.__setattr__(self, "_lightms_log_target", None)
        object.__setattr__(self, "_lightms_counters", None)
        object.__setattr__(self, "_lightms_in_step", False)
        object.__setattr__(self, "_lightms_optimizers", None)
        object.__setattr__(self, "_lightms_schedulers", ())
        object.__setattr__(self, "_lightms_dry_run", False)
        object.__setattr__(self, "_lightms_grad_reduce", None)
        object.__setattr__(self, "_hparams", AttributeDict())
        object.__setattr__(self, "_automatic_optimization", True)

    # ---- trainer state ------------------------------------------------------
    @property
    def trainer(self):
        """The `Trainer` running this module, or None outside a run."""
        return self._trainer

    @property
    def current_epoch(self):
        """The epoch number (0-based): a device scalar inside steps, an int elsewhere."""
        if self._lightms_in_step and self._lightms_counters is not None:
            return self._lightms_counters.current_epoch
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self):
        """Optimizer steps taken so far (manual optimization: training_step calls): a device scalar inside
        steps, an int elsewhere."""
        if self._lightms_in_step and self._lightms_counters is not None:
            return self._lightms_counters.global_step
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def automatic_optimization(self) -> bool:
        """True (the default): the Trainer differentiates the loss training_step returns and steps the optimizer.

        Set it to False in `__init__` for manual optimization: training_step then computes
        gradients with `self.value_and_grad` and applies them with `self.optimizer_step`, for
        any number of optimizers (`self.optimizers()`), in the order the code runs.
        """
        return self._automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"automatic_optimization must be True or False, got {value!r}.")
        object.__setattr__(self, "_automatic_optimization", value)

    # ---- hyperparameters ------------------------------------------------------
    def save_hyperparameters(self, *names: str, ignore=None) -> None:
        """Stores the arguments of `__init__` in `self.hparams` (call it from `__init__`).

        Args:
            *names: Only these arguments; all of them when empty.
            ignore: A name or list of names to leave out.

        Raises:
            RuntimeError: If not called from inside `__init__`.
        """
        frame = inspect.currentframe().f_back
        try:
            arguments = collect_init_arguments(frame, self)
        finally:
            del frame
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        selected = {k: v for k, v in arguments.items() if (not names or k in names) and k not in ignore}
        self._hparams.update(selected)

    @property
    def hparams(self) -> AttributeDict:
        """The hyperparameters stored by `save_hyperparameters`."""
        return self._hparams

    # ---- logging ----------------------------------------------------------------
    def log(self, name, value, prog_bar=False, logger=True, on_step=None, on_epoch=None,
            reduce_fx="mean", batch_size=None, sync_dist=False):
        """Logs one scalar, as Lightning's `self.log`.

        Inside compiled steps the value stays on the device until a logger, the
        progress bar or a callback reads it. Epoch values are batch-size-weighted means
        (or the sum, max or min, per `reduce_fx`).

        Args:
            name: Metric name.
            value: A scalar Tensor or a number.
            prog_bar: Show on the progress bar.
            logger: Send to the loggers.
            on_step: Report per optimizer step; default True in training_step and
                on_train_batch_*, else False.
            on_epoch: Report the epoch reduction; default the opposite of on_step's default.
            reduce_fx: "mean", "sum", "max" or "min".
            batch_size: Weight for the mean; default the size of the current batch.
            sync_dist: Under data parallelism, reduce the value over the workers (with
                `reduce_fx`; an epoch mean weighs each worker's batches): in training_step each
                step value inside the compiled step (one AllReduce per optimizer step for the
                names with on_step), the epoch value at the epoch's end; in a hook, as it is logged
                (every worker must log it). Without it each worker keeps its own, and rank
                0's is reported, as in Lightning.

        Raises:
            RuntimeError: If called while no Trainer is running the module.
        """
        target = self._lightms_log_target
        if target is None:
            raise RuntimeError(
                f"self.log({name!r}) was called outside of a lightms.Trainer run; "
                "log from training_step, validation_step, test_step or an on_* hook."
            )
        return target.log(self._lightms_hook, name, value, prog_bar, logger, on_step, on_epoch,
                          reduce_fx, batch_size, sync_dist)

    def log_dict(self, dictionary: Mapping[str, Any], prog_bar=False, logger=True, on_step=None,
                 on_epoch=None, reduce_fx="mean", batch_size=None, sync_dist=False) -> None:
        """Logs every item of `dictionary` with the same options (see `log`)."""
        for name, value in dictionary.items():
            self.log(name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist)

    # ---- steps and optimizers ------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """Computes the loss of one batch. Returns a scalar Tensor or a dict with key "loss"."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx).")

    validation_step = None  # define `validation_step(self, batch, batch_idx)` to validate
    test_step = None  # define `test_step(self, batch, batch_idx)` to test

    def predict_step(self, batch, batch_idx):
        """Returns the prediction for one batch; by default `self(batch)` on the first element."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    def configure_optimizers(self):
        """Returns the `mindspore.nn.Optimizer` (or `mindspore.experimental.optim.Optimizer`) to train with."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement configure_optimizers() returning a mindspore.nn.Optimizer."
        )

    # ---- manual optimization -----------------------------------------------------------
    def optimizers(self):
        """The optimizers `configure_optimizers` returned, in its order (the optimizer itself when there is one).

        Raises:
            RuntimeError: Outside a `Trainer.fit` run.
        """
        optimizers = self._lightms_optimizers
        if optimizers is None:
            raise RuntimeError("self.optimizers() is available while Trainer.fit runs the module.")
        if len(optimizers) == 1:
            return optimizers[0]
        return optimizers

    def lr_schedulers(self):
        """The host-side schedulers `configure_optimizers` returned: None, the scheduler, or a list.

        As in Lightning's manual optimization, the Trainer does not step them: call
        `.step()` from a hook (`on_train_epoch_end`, `on_train_batch_end`).
        """
        schedulers = self._lightms_schedulers
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else list(schedulers)

    def value_and_grad(self, fn, optimizer, has_aux: bool = False):
        """`fn`'s value and its gradients with respect to `optimizer`'s parameters (manual optimization).

        `self.value_and_grad(fn, opt)(*args)` returns `(fn(*args), grads)`; with `has_aux=True`,
        `fn` returns `(loss, aux...)` and the call `((loss, aux...), grads)`, as
        `mindspore.value_and_grad`. Only `loss` is differentiated. Compiled into the training graph.

        Args:
            fn: A function (defined with `def`, not `lambda`) returning a scalar loss.
            optimizer: One of `self.optimizers()`.
            has_aux: Whether `fn` returns more than the loss.

        Returns:
            A function of `fn`'s arguments.
        """
        grad_fn = ms.value_and_grad(fn, None, optimizer.parameters, has_aux=has_aux)
        reduce = self._lightms_grad_reduce
        if reduce is None:
            return grad_fn

        def averaged(*args):  # data-parallel: the gradients' mean over the workers
            value, grads = grad_fn(*args)
            return value, reduce(grads)

        return averaged

    def optimizer_step(self, optimizer, grads):
        """Applies `grads` (from `self.value_and_grad(fn, optimizer)`) with `optimizer` (manual optimization).

        Updates run in the order training_step calls them: a loss computed after this call
        sees the updated weights. The dry run (training_step's one eager run before compiling)
        skips the update: a `mindspore.experimental.optim` optimizer run eagerly once fails to
        compile afterwards (MindSpore 2.10 caches its `@jit` method), so call this rather than
        `optimizer(grads)`.
        """
        if self._lightms_dry_run:
            _check_gradients_fit(self, optimizer, grads)
            return True
        return optimizer(grads)

    def clip_gradients(self, grads, gradient_clip_val=None, gradient_clip_algorithm: str = "norm"):
        """Returns `grads` clipped (manual optimization; the Trainer's `gradient_clip_val` is for automatic).

        Args:
            grads: The gradients from `self.value_and_grad`.
            gradient_clip_val: The threshold.
            gradient_clip_algorithm: "norm" (scale all so that their global L2 norm is at most
                the threshold) or "value" (clamp each element into [-val, val]).

        Raises:
            ValueError: For a missing or non-positive threshold or another algorithm.
        """
        check_clip_arguments(gradient_clip_val, gradient_clip_algorithm, "self.clip_gradients")
        if gradient_clip_algorithm == "norm":
            return clip_by_norm(grads, gradient_clip_val)
        return clip_by_value(grads, gradient_clip_val)

    # ---- hooks (Lightning's names; each does nothing by default) ---------------------
    def setup(self, stage: str) -> None:
        """Called at the start of fit/validate/test/predict."""

    def teardown(self, stage: str) -> None:
        """Called at the end of fit/validate/test/predict."""

    def on_fit_start(self): """Called at the start of `fit`."""
    def on_fit_end(self): """Called at the end of `fit`."""
    def on_train_start(self): """Called before the first training epoch."""
    def on_train_end(self): """Called after the last training epoch."""
    def on_train_epoch_start(self): """Called at the start of each training epoch."""
    def on_train_epoch_end(self): """Called at the end of each training epoch, after its validation."""
    def on_train_batch_start(self, batch, batch_idx): """Called before each training batch."""
    def on_train_batch_end(self, outputs, batch, batch_idx): """Called after each training batch."""
    def on_validation_start(self): """Called at the start of a validation run."""
    def on_validation_end(self): """Called at the end of a validation run."""
    def on_validation_epoch_start(self): """Called before the first validation batch."""
    def on_validation_epoch_end(self): """Called after the last validation batch."""
    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0): """Before each validation batch."""
    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0): """After each validation batch."""
    def on_test_start(self): """Called at the start of `test`."""
    def on_test_end(self): """Called at the end of `test`."""
    def on_test_epoch_start(self): """Called before the first test batch."""
    def on_test_epoch_end(self): """Called after the last test batch."""
    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0): """Called before each test batch."""
    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0): """Called after each test batch."""
    def on_predict_start(self): """Called at the start of `predict`."""
    def on_predict_end(self): """Called at the end of `predict`."""
    def on_predict_epoch_start(self): """Called before the first predict batch."""
    def on_predict_epoch_end(self): """Called after the last predict batch."""
    def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0): """Called before each predict batch."""
    def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0): """Called after each predict batch."""

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Called before a full checkpoint is written; add JSON-serialisable entries to `checkpoint`."""

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Called when a run is restored from a checkpoint, with what `on_save_checkpoint` saw."""

    # ---- checkpoints ------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, **overrides):
        """Builds the module from a checkpoint's hyperparameters and loads its weights.

        Args:
            checkpoint_path: A `.ckpt` written by lightms.
            **overrides: Hyperparameters that replace the saved ones.

        Returns:
            The module, with its weights loaded.

        Raises:
            ValueError: If the checkpoint is corrupt, its parameters do not fit the module, or its
                weights are NaN or infinite (a diverged run).
            TypeError: If the saved hyperparameters do not fit `__init__`.
        """
        from lightms.checkpoint.io import assign_parameters, read_checkpoint, split_saved

        path = os.fspath(checkpoint_path)
        saved, meta = read_checkpoint(path)
        hparams = {**meta.get("hparams", {}), **overrides}
        try:
            module = cls(**hparams)
        except TypeError as error:
            raise TypeError(f"{cls.__name__}.load_from_checkpoint: the checkpoint's hyperparameters "
                            f"{sorted(hparams)} do not fit {cls.__name__}.__init__ ({error}).") from None
        assign_parameters({p.name: p for p in module.get_parameters()}, split_saved(saved)["model"], "model", path,
                          finite="model")
        return module

