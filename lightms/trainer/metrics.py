"""The host's view of logged values: what loggers, the progress bar and callbacks read.

Values logged inside compiled steps stay in device buffers (one set per stage);
this store reads them only when somebody asks: a logger at a logging step, the
progress bar at a redraw, a callback through `trainer.callback_metrics`, or the
end of an epoch.
"""

from typing import Dict, List, Optional, Tuple

from lightms.module.logging import DeviceLogBuffers, HostLogs, LogOptions

STAGES = ("train", "validation", "test", "predict")


def stage_of_hook(hook: Optional[str]) -> str:
    """Returns the stage a hook belongs to ("on_validation_epoch_end" -> "validation")."""
    hook = hook or ""
    for stage in ("validation", "test", "predict"):
        if stage in hook:
            return stage
    return "train"


class MetricStore:
    """Collects logged values per stage and reports them under Lightning's names."""

    def __init__(self):
        self.callback_metrics: Dict[str, float] = {}
        self.logged_metrics: Dict[str, float] = {}
        self.progress_bar_metrics: Dict[str, float] = {}
        self.device: Dict[str, DeviceLogBuffers] = {}
        self.host: Dict[str, HostLogs] = {stage: HostLogs() for stage in STAGES}
        self._step_read: Optional[int] = None
        self._step_for_logger: Dict[str, float] = {}
        self._keep_train_buffers = False

    @property
    def host_reads(self) -> int:
        """Device-to-host reads made for logged values so far."""
        return sum(buffers.host_reads for buffers in self.device.values())

    def restore_train_buffers(self, buffers: DeviceLogBuffers) -> None:
        """Installs training buffers restored from a mid-epoch checkpoint; the next epoch start keeps them."""
        self.device["train"] = buffers
        self._keep_train_buffers = True

    def start_run(self) -> None:
        """Clears every device buffer kept from an earlier run of this Trainer."""
        self._keep_train_buffers = False
        for buffers in self.device.values():
            buffers.clear()

    def start_epoch(self, stage: str) -> None:
        """Clears a stage's accumulators (no host sync)."""
        if stage == "train" and self._keep_train_buffers:
            self._keep_train_buffers = False
        elif stage in self.device:
            self.device[stage].reset()
        self.host[stage].reset()
        if stage == "train":
            self._step_read = None

    def has_progress_bar_names(self) -> bool:
        """Whether any name logged so far in this run has prog_bar=True (in a step or a hook)."""
        return any(opt.prog_bar for buffers in self.device.values() for opt in buffers.options) or any(
            opt.prog_bar for logs in self.host.values() for opt in logs.options.values())

    def _options(self, stage: str, name: str) -> LogOptions:
        host = self.host[stage].options
        return host[name] if name in host else self.device[stage].options[self.device[stage].index[name]]

    def _publish(self, stage: str, values: Dict[str, float], level: str) -> Dict[str, float]:
        for_logger = {}
        for name, value in values.items():
            options = self._options(stage, name)
            reported = options.reported_names().get(level)
            if reported is None:
                continue
            self.callback_metrics[reported] = value
            if level == "epoch":
                self.callback_metrics[name] = value
            if options.prog_bar:
                self.progress_bar_metrics[reported] = value
            if options.logger:
                self.logged_metrics[reported] = value
                for_logger[reported] = value
        return for_logger

    def read_train_step(self, global_step: int) -> Dict[str, float]:
        """Returns the values of optimizer step `global_step` bound for loggers.

        The device is read at most once per step, however many ask.
        """
        if self._step_read != global_step:
            self._step_read = global_step
            values = dict(self.device["train"].read_step()) if "train" in self.device else {}
            values.update(self.host["train"].read_step())
            self._step_for_logger = self._publish("train", values, "step")
        return self._step_for_logger

    def read_sunk_steps(self, steps: List[int], first_step: int) -> List[Tuple[int, Dict[str, float]]]:
        """Returns (step, values bound for loggers) for chosen optimizer steps of the last sunk chunk.

        One host read of the chunk's step-value history, however many steps are chosen.

        Args:
            steps: Global steps of the chunk, ascending.
            first_step: The global step the chunk's first optimizer step got.
        """
        rows = self.device["train"].read_history() if "train" in self.device else []
        out = []
        for step in steps:
            values = dict(rows[step - first_step]) if rows else {}
            if step == steps[-1]:
                values.update(self.host["train"].read_step())
            out.append((step, self._publish("train", values, "step")))
        if out:
            self._step_read, self._step_for_logger = out[-1]
        return out

    def read_epoch(self, stage: str) -> Dict[str, float]:
        """Reads a stage's epoch values; returns those bound for loggers."""
        values = dict(self.device[stage].read_epoch()) if stage in self.device else {}
        values.update(self.host[stage].read_epoch())
        return self._publish(stage, values, "epoch")
