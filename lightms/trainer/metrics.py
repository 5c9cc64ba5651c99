"""The host's view of logged values: what loggers, the progress bar and callbacks read.

Values logged inside compiled steps stay in device buffers (one set per stage);
this store reads them only when somebody asks: a logger at a logging step, the
progress bar at a redraw, a callback through `trainer.callback_metrics`, or the
end of an epoch.
"""

from typing import Dict, List, Optional, Tuple

from lightms.module.device_logs import DeviceLogBuffers
from lightms.module.logging import HostLogs, LogOptions

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

    def __init__(self, world_size: int = 1):
        self.callback_metrics: Dict[str, float] = {}
        self.logged_metrics: Dict[str, float] = {}
        self.progress_bar_metrics: Dict[str, float] = {}
        self.device: Dict[str, DeviceLogBuffers] = {}
        # Data parallelism: training's values logged with sync_dist are reduced over the workers; every worker
        # evaluates all the data, so evaluation values are already the whole data's.
        self.host: Dict[str, HostLogs] = {stage: HostLogs(world_size if stage == "train" else 1) for stage in STAGES}
        self._step_read: Optional[int] = None
        self._step_for_logger: Dict[str, float] = {}
        # The stage whose epoch-end hooks are running (its device values were read): values its hooks log
        # on the host are published whenever callback_metrics is read, as Lightning's are.
        self.epoch_ending: Optional[str] = None
        self._device_epoch: Dict[str, float] = {}

    @property
    def host_reads(self) -> int:
        """Device-to-host reads made for logged values so far."""
        return sum(buffers.host_reads for buffers in self.device.values())

    def start_run(self) -> None:
        """Clears every device buffer kept from an earlier run of this Trainer."""
        self.epoch_ending = None  # a failed run may have stopped inside epoch-end hooks
        for buffers in self.device.values():
            buffers.clear()

    def start_epoch(self, stage: str) -> None:
        """Clears a stage's accumulators (no host sync)."""
        if stage in self.device:
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

    def end_epoch(self, stage: str) -> Dict[str, float]:
        """Reads a stage's epoch values before its epoch-end hooks run; returns those bound for loggers.

        Until `epoch_ended` is called, `refresh_epoch` publishes what the hooks log on the host.
        """
        self._device_epoch = dict(self.device[stage].read_epoch()) if stage in self.device else {}
        self.epoch_ending = stage
        return self.refresh_epoch()

    def refresh_epoch(self) -> Dict[str, float]:
        """Publishes the ending epoch's values again with what host hooks logged since; returns those bound for
        loggers (no host sync)."""
        if self.epoch_ending is None:
            return {}
        values = dict(self._device_epoch)
        values.update(self.host[self.epoch_ending].read_epoch())
        return self._publish(self.epoch_ending, values, "epoch")

    def epoch_ended(self) -> Dict[str, float]:
        """Ends the epoch-end hooks of the stage `end_epoch` started; returns its values bound for loggers."""
        values = self.refresh_epoch()
        self.epoch_ending = None
        return values
