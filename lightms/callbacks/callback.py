"""`Callback`: the base class of everything that hooks into a run."""

from typing import Any, Dict


class Callback:
    """Hooks into a Trainer run, with Lightning's hook names and arguments.

    Every hook receives `(trainer, module, ...)` and does nothing by default.
    Callbacks run in ascending `order` (ties keep the order they were given in).
    The module's own hook of the same name runs at `MODULE_ORDER`: callbacks with
    a lower order run before it, the others after it.

    Attributes:
        order: Position in the hook sequence. Default 0 (before the module, as in
            Lightning). Callbacks that act on what the module logged in the same hook
            (checkpointing, early stopping: Lightning's "monitoring" callbacks) use
            an order above MODULE_ORDER; the progress bar uses the highest.
    """

    MODULE_ORDER = 100
    order: int = 0

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint."""
        return type(self).__qualname__

    def state_dict(self) -> Dict[str, Any]:
        """Returns what must be saved to resume this callback exactly."""
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores what `state_dict` returned."""

    def needs_host_at_step(self, trainer, step: int) -> bool:
        """Whether this callback must run right after optimizer step `step`.

        Under `Trainer(sink_size>1)`, batch hooks run once per sunk chunk; a chunk ends
        after every step for which a callback returns True, so that its
        `on_train_batch_end` sees exactly that `trainer.global_step`. Default: False.
        """
        return False

    def setup(self, trainer, module, stage: str) -> None: """Called at the start of fit/validate/test/predict."""
    def teardown(self, trainer, module, stage: str) -> None: """Called at the end of fit/validate/test/predict."""
    def on_fit_start(self, trainer, module) -> None: """Called at the start of fit."""
    def on_fit_end(self, trainer, module) -> None: """Called at the end of fit."""
    def on_sanity_check_start(self, trainer, module) -> None: """Called before the sanity validation."""
    def on_sanity_check_end(self, trainer, module) -> None: """Called after the sanity validation."""
    def on_train_start(self, trainer, module) -> None: """Called before the first training epoch."""
    def on_train_end(self, trainer, module) -> None: """Called after the last training epoch."""
    def on_train_epoch_start(self, trainer, module) -> None: """Called at the start of a training epoch."""
    def on_train_epoch_end(self, trainer, module) -> None: """Called at the end of a training epoch."""
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None: """Before a training batch."""
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None: """After a training batch."""
    def on_validation_start(self, trainer, module) -> None: """Called at the start of a validation run."""
    def on_validation_end(self, trainer, module) -> None: """Called at the end of a validation run."""
    def on_validation_epoch_start(self, trainer, module) -> None: """Before the first validation batch."""
    def on_validation_epoch_end(self, trainer, module) -> None: """After the last validation batch."""
    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        """Called before a validation batch."""
    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Called after a validation batch."""
    def on_test_start(self, trainer, module) -> None: """Called at the start of test."""
    def on_test_end(self, trainer, module) -> None: """Called at the end of test."""
    def on_test_epoch_start(self, trainer, module) -> None: """Called before the first test batch."""
    def on_test_epoch_end(self, trainer, module) -> None: """Called after the last test batch."""
    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        """Called before a test batch."""
    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Called after a test batch."""
    def on_predict_start(self, trainer, module) -> None: """Called at the start of predict."""
    def on_predict_end(self, trainer, module) -> None: """Called at the end of predict."""
    def on_predict_epoch_start(self, trainer, module) -> None: """Called before the first predict batch."""
    def on_predict_epoch_end(self, trainer, module) -> None: """Called after the last predict batch."""
    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        """Called before a predict batch."""
    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Called after a predict batch."""
    def on_exception(self, trainer, module, exception: BaseException) -> None:
        """Called when the run raises."""
