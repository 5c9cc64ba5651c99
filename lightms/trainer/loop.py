"""The loop: fit epochs, training batches, validation scheduling and evaluation passes.

One readable set of plain for-loops around the compiled steps, mixed into `Trainer`:
`Trainer` holds the arguments, the public state and the entry points; this holds
what happens between them. Host reads of device values happen only where marked
(logging steps, epoch ends, `detect_anomaly`).
"""

import math
import sys
import warnings
from typing import Dict, Optional

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Tensor, ops
from lightms.checkpoint.io import assign_parameters
from lightms.checkpoint.run_state import restore_run_state
from lightms.module.logging import HostLogs
from lightms.precision.precision import warn_half_optimizer
from lightms.step.binding import inside_step
from lightms.step.builder import build_eval_step, build_train_step, gradient_pipeline, module_metrics
from lightms.step.eval_step import EvalStep
from lightms.step.graph import compile_function
from lightms.step.train_step import TrainStep
from lightms.trainer.data import DataSource
from lightms.trainer.hooks import hook_receivers
from lightms.trainer.interrupts import Interrupted
from lightms.trainer.optimizers import read_optimizer_config, step_schedulers
from lightms.trainer.sinking import (SINK_MEMORY_LIMIT, Chunk, StackBuffers, check_sinkable, fit_in_memory,
                                    resolve_sink_length)

EVAL_HOOKS = {"validation": "validation_step", "test": "test_step", "predict": "predict_step"}


class TrainingLoop:
    """The loop half of `Trainer` (a mixin: it uses the Trainer's state and hooks)."""

    def _warn_unsinkable_steps(self) -> None:
        """Says once, loudly, when the configuration makes every optimizer step end a sunk chunk."""
        if self._sink_length == 1:
            return
        reasons = []
        if self.detect_anomaly:
            reasons.append("detect_anomaly=True checks the loss after every optimizer step")
        if any(config.interval == "step" and config.frequency == 1 for config in self._optimizer_config.schedulers):
            reasons.append("a host-side lr scheduler with interval 'step' steps between optimizer steps "
                           "(an nn.LearningRateSchedule in the optimizer runs inside the graph)")
        if isinstance(self.val_check_interval, int) and self.val_check_interval == 1 and self._val_source is not None:
            reasons.append("val_check_interval=1 validates after every optimizer step")
        for cb in self.callbacks:
            if all(cb.needs_host_at_step(self, step) for step in (1, 2, 3)):
                reasons.append(f"{type(cb).__name__} needs the host after every optimizer step")
        if reasons:
            warnings.warn(f"Trainer(sink_size={self.sink_size!r}): chunks end after every optimizer step because "
                          + "; ".join(reasons) + f". Up to accumulate={self.accumulate} micro-batches are sunk "
                          "per host call.", stacklevel=4)

    def _build_train_step(self, batch) -> TrainStep:
        step, logs = build_train_step(self.model, batch, self._optimizer_config.optimizer, self._counters,
                                      self._metrics.device.get("train"), self.accumulate,
                                      gradient_pipeline(self.gradient_clip_val, self.gradient_clip_algorithm),
                                      self.compile, self._sink_length, self._loss_scaler, self.precision.autocast,
                                      step_history=bool(self.loggers))
        self._metrics.device["train"] = logs
        if self._pending_accumulators:  # a checkpoint written inside an accumulation window
            assign_parameters({p.name: p for p in step.accumulators}, self._pending_accumulators,
                              "accumulation window", str(self._ckpt_path))
            self._pending_accumulators = None
        return step

    def _build_eval_step(self, stage: str, batch) -> EvalStep:
        step, target, logs = build_eval_step(self.model, stage, EVAL_HOOKS[stage], batch, self._metrics.host[stage],
                                             self.compile, self.precision.autocast)
        if logs is not None:
            self._metrics.device[stage] = logs
        self._eval_log_targets[stage] = target
        return step

    # ---- the loops ----------------------------------------------------------------------
    def _fit(self, train: DataSource, val: Optional[DataSource]) -> None:
        model = self.model
        self._optimizer_config = read_optimizer_config(model.configure_optimizers(), type(model).__name__)
        self.optimizers = [self._optimizer_config.optimizer]
        self._loss_scaler = self.precision.loss_scaler()
        if self._loss_scaler is not None:  # a skipped step is counted on the device, and the host reads it
            self._counters.global_step_read = True
        warn_half_optimizer(self.precision, self._optimizer_config.optimizer)
        if self._ckpt_path is not None:
            restore_run_state(self, self._ckpt_path)
            train.resume_at(self.state.current_epoch, self.state.batches_done)
            self._counters.set(self.state.current_epoch, self.state.global_step)  # the restored values
        self._train_source = train
        self.num_training_batches = train.batch_count(self.limit_train_batches)
        if self.num_training_batches == 0:
            if train.length() == 0:
                raise ValueError("train_dataloaders yielded no batches: the dataset is empty.")
            raise ValueError(f"Trainer(limit_train_batches={self.limit_train_batches}) leaves no training batches.")
        self._sink_length = resolve_sink_length(self.sink_size, self.num_training_batches) if self.compile else 1
        self._sink_shapes = None  # the batch shapes of the run's first chunk: chunks of them are padded
        self._sink_plans = {}  # Chunk.device_inputs' Tensors by plan
        self._stack_buffers = StackBuffers()
        has_val = val is not None and self.limit_val_batches != 0 and getattr(type(model), "validation_step") is not None
        self._val_source = val if has_val else None
        self._validation_runs = 0
        self._finite_check = None  # built at the first check, over this run's trainable parameters
        self._check_validation_can_run()
        self._warn_unsinkable_steps()
        if model.hparams:
            for lg in self.loggers:
                lg.log_hyperparams(dict(model.hparams))
        self._call("on_fit_start")
        if self._val_source is not None and self.num_sanity_val_steps != 0:
            self.state.sanity_checking = True
            self._call("on_sanity_check_start")
            limit = None if self.num_sanity_val_steps == -1 else self.num_sanity_val_steps
            self._eval_loop("validation", self._val_source, limit)
            self._call("on_sanity_check_end")
            self.state.sanity_checking = False
        self._call("on_train_start")
        while not self._fit_done():
            self._train_epoch()
            state = self.state
            state.current_epoch, state.batches_done, state.epoch_done = state.current_epoch + 1, 0, False
            self._stop_if_interrupted()  # a signal during the epoch's validation or end hooks
        self._call("on_train_end")
        self._call("on_fit_end")
        self._stop_if_interrupted()

    def _check_validation_can_run(self) -> None:
        """Refuses a validation schedule that never comes due in this fit (as Lightning does).

        Raises:
            ValueError: If an int val_check_interval exceeds the optimizer steps of the run.
        """
        if self._val_source is None or not isinstance(self.val_check_interval, int):
            return
        total = self.estimated_stepping_batches
        if total != float("inf") and self.val_check_interval > total:
            raise ValueError(
                f"Trainer(val_check_interval={self.val_check_interval}) validates every that many optimizer steps, "
                f"but this fit takes {int(total)} (max_epochs={self.max_epochs}, max_steps={self.max_steps}, "
                f"{self.num_training_batches} batches per epoch, accumulate={self.accumulate}), so validation would "
                "never run. Use a smaller val_check_interval, or None to validate at epoch ends.")

    def _check_nonfinite(self) -> None:
        """Checks that the run's losses and the trainable parameters are finite (one host sync); raises or warns once.

        The device sums the losses of the run (NaN and infinities carry through); the
        parameters are checked too, because a NaN in the input can reach the weights while
        the loss stays finite (MindSpore's ReLU maps NaN to 0). Called at epoch ends, or after
        every optimizer step under detect_anomaly, so the first check that fails names the
        epoch (or step) where it happened.
        """
        if self._counters is None:
            return
        if self._finite_check is None:
            self._finite_check = compile_function(_all_finite(self._counters, self.model.trainable_params()),
                                                  self.compile)
        finite = bool(self._finite_check().asnumpy())
        self._extra_host_reads += 1
        host = self._counters.host  # what was warned about lives with the device sum it read
        if finite or host.nonfinite_warned:
            return
        loss_finite = math.isfinite(float(self._counters.loss_sum.asnumpy()))
        broken = [p.name for p in self.model.trainable_params() if not np.isfinite(p.asnumpy()).all()]
        what = ("the training loss was NaN or infinite" if not loss_finite else
                f"parameters {broken} became NaN or infinite while the training loss stayed finite (a NaN or "
                "infinity in the input data can do this: MindSpore's ReLU maps NaN to 0)")
        if self.detect_anomaly:
            logged = self._metrics.read_train_step(self.state.global_step)
            raise FloatingPointError(
                f"Trainer(detect_anomaly=True): {what} at optimizer step {self.state.global_step} "
                f"(epoch {self.state.current_epoch}, batch {self.state.batch_idx}). "
                f"Values logged at that step: {logged or 'none'}.")
        host.nonfinite_warned = True
        where = f" in epoch {self.state.current_epoch}"
        what = what[0].upper() + what[1:].replace(" became NaN or infinite", " became NaN or infinite" + where) \
            if loss_finite else f"The training loss was NaN or infinite{where}"
        warnings.warn(f"{what} (lightms warns once per fit); training goes on. Trainer(detect_anomaly=True) stops "
                      "at the first such step.", stacklevel=2)

    def _stop_if_interrupted(self) -> None:
        if self._interrupt_signal is not None:
            self._stop_for_interrupt()

    def _request_stop(self, signum: int) -> None:
        self._interrupt_signal = signum

    def _stop_for_interrupt(self) -> None:
        """Writes a resumable checkpoint (when checkpointing is on) and ends fit."""
        name = "SIGINT/SIGTERM"  # indistinguishable once MindSpore runs (see stop_requests)
        callback = self.checkpoint_callback
        if callback is not None:
            path = callback.new_path(f"interrupted-epoch={self.state.current_epoch}-step={self.state.global_step}")
            self.save_checkpoint(path)
            where = f"a checkpoint that resumes exactly is at {path} (fit(..., ckpt_path=that path))"
        else:
            where = "checkpointing is off, so no checkpoint was written"
        print(f"lightms: {name} received; stopped after optimizer step {self.state.global_step}; {where}.",
              file=sys.stderr)
        raise Interrupted(self._interrupt_signal)

    def _step_schedulers(self, interval: str, count: int) -> None:
        if self._optimizer_config.schedulers:
            step_schedulers(self._optimizer_config.schedulers, interval, count, lambda: self.callback_metrics)

    def _fit_done(self) -> bool:
        if self.state.should_stop:
            return True
        if self.max_steps != -1 and self.state.global_step >= self.max_steps:
            return True
        return self.max_epochs != -1 and self.state.current_epoch >= self.max_epochs

    def _val_due_at_epoch_end(self) -> bool:
        if self._val_source is None or isinstance(self.val_check_interval, int):
            return False
        return (self.state.current_epoch + 1) % self.check_val_every_n_epoch == 0

    def _val_due_in_epoch(self, batch, closed_window: bool, step: int) -> bool:
        """Whether validation runs after `batch`, which took the run to optimizer step `step`."""
        if self._val_source is None or not closed_window:  # never inside an accumulation window
            return False
        interval = self.val_check_interval
        if isinstance(interval, int):
            epoch_ok = self.check_val_every_n_epoch is None or \
                (self.state.current_epoch + 1) % self.check_val_every_n_epoch == 0
            return closed_window and epoch_ok and step % interval == 0
        if interval is None or interval == 1.0 or batch.is_last or self.num_training_batches is None:
            return False
        every = max(1, int(self.num_training_batches * interval))
        return (batch.index + 1) % every == 0 and self._val_due_at_epoch_end()

    def _train_epoch(self) -> None:
        model, state, metrics = self.model, self.state, self._metrics
        model.set_train(True)
        metrics.start_epoch("train")
        self._counters.set(state.current_epoch, state.global_step, read_only=True)
        state.epoch_done = False
        self._call("on_train_epoch_start")
        chunk = self._new_chunk()
        for batch in self._train_source.batches(self.limit_train_batches):
            if self._train_step is None and self._sink_length > 1 and not chunk.batches:
                check_sinkable(batch.data, "train_dataloaders")
                self._limit_sink_memory(batch)
                chunk = self._new_chunk()
            if not chunk.accepts(batch):  # a batch of another size: it starts a chunk of its own
                if self._run_chunk(chunk):
                    chunk = None
                    break
                chunk = self._new_chunk()
            closes = chunk.add(batch, self.accumulate)
            if (len(chunk.batches) < self._sink_length and not batch.is_last
                    and not (closes and self._host_needed_after(state.global_step + chunk.steps, batch))):
                continue
            if self._run_chunk(chunk):
                chunk = None
                break
            chunk = self._new_chunk()
        if chunk is not None and chunk.batches:  # only when a limit or the data ended mid-chunk
            self._run_chunk(chunk)
        if self._val_due_at_epoch_end():
            self._run_validation()
        if not self.detect_anomaly:
            self._check_nonfinite()
        state.epoch_done = True
        self._read_step_values()
        # Read before on_train_epoch_end, so its callbacks (checkpoints, early stopping) can monitor epoch values.
        metrics.end_epoch("train")
        self._call("on_train_epoch_end")
        self._logger_write(metrics.epoch_ended())
        self._step_schedulers("epoch", state.current_epoch + 1)

    def _new_chunk(self) -> Chunk:
        """An empty chunk that starts at the open window; stacked buffers of the sink length when sinking."""
        if self._sink_length == 1:
            return Chunk(self.state.window)
        return Chunk(self.state.window, self._sink_length, self._stack_buffers)

    def _limit_sink_memory(self, batch) -> None:
        """Shortens the sink length, loudly, if a stacked chunk of it would not fit in memory."""
        fitting = fit_in_memory(self._sink_length, batch.data)
        if fitting < self._sink_length:
            warnings.warn(f"Trainer(sink_size={self.sink_size!r}): {self._sink_length} stacked batches would take more "
                          f"than {SINK_MEMORY_LIMIT >> 20} MiB of host memory; lightms sinks {fitting} per host call "
                          "instead.", stacklevel=4)
            self._sink_length = fitting

    def _host_needed_after(self, step: int, batch) -> bool:
        """Whether the host must act right after optimizer step `step` (so a sunk chunk ends there)."""
        if self.detect_anomaly or (self.max_steps != -1 and step >= self.max_steps):
            return True
        if self._val_source is not None and self._val_due_in_epoch(batch, True, step):
            return True
        if any(config.interval == "step" and config.due(step) for config in self._optimizer_config.schedulers):
            return True
        # Asked for every batch of a chunk: only callbacks that override the default (False) are asked.
        receivers = hook_receivers(self, "needs_host_at_step")
        return any(cb.needs_host_at_step(self, step) for cb in receivers.before + receivers.after)

    def _hook_batches(self, chunk: Chunk, hooks=("on_train_batch_start", "on_train_batch_end")):
        """The `batch` the training batch hooks get (`Chunk.hook_batches`); under sinking None when no
        receiver's code of `hooks` reads it (which no hook can observe)."""
        if not chunk.length or any(hook_receivers(self, hook).reads_batch for hook in hooks):
            return chunk.hook_batches()
        return None

    def _run_chunk(self, chunk: Chunk) -> bool:
        """Trains on a chunk's micro-batches (one host call when sinking) and does what follows its steps.

        Returns:
            Whether the epoch must end (a hook returned -1, should_stop, max_steps).
        """
        model, state, metrics = self.model, self.state, self._metrics
        first, last = chunk.batches[0], chunk.batches[-1]
        sinking = self._sink_length > 1
        state.batch_idx = first.index
        self.sink_batches = range(first.index, last.index + 1)
        data = self._hook_batches(chunk)
        end_epoch = False
        if self._call("on_train_batch_start", data, first.index) == -1:
            if not state.window:
                return True
            # Ending now would leave gradients in the accumulators: finish the window first.
            warnings.warn("on_train_batch_start returned -1 inside an accumulation window; lightms "
                          "finishes the window, then ends the epoch.", stacklevel=3)
            chunk.cut_after_first()
            last, end_epoch, data = first, True, self._hook_batches(chunk)
            self.sink_batches = range(first.index, first.index + 1)
        if self._train_step is None:
            self._train_step = self._build_train_step(first)
        logs = metrics.device["train"]
        logs.set_batch_size(first.size)
        self._counters.expect(first.index)
        with inside_step(model, "training_step", logs):
            if sinking:
                loss = self._train_step.sink_step(*chunk.device_inputs(self._stacked_length(chunk), self._sink_plans))
            elif chunk.sizes[0]:
                loss = self._train_step.optimizer_step(first.data, chunk.sizes[0])
            else:
                loss = self._train_step.window_step(first.data)
        self._counters.advanced(len(chunk.batches))
        if not logs.written:
            logs.written = True  # the step values exist from now on
        state.batches_done = last.index + 1
        state.window = chunk.window
        before = state.global_step
        if self._loss_scaler is not None and chunk.steps:
            # Overflowing steps were skipped on the device: the real count decides what comes next.
            state.global_step = int(self._counters.global_step.asnumpy())
            self._extra_host_reads += 1
        else:
            state.global_step += chunk.steps
        steps_taken = state.global_step - before
        if self._optimizer_config.schedulers:
            for step in range(before + 1, state.global_step + 1):
                self._step_schedulers("step", step)
        if chunk.steps and self.detect_anomaly:
            self._check_nonfinite()
        if data is None:  # a receiver added since on_train_batch_start may read it
            data = self._hook_batches(chunk, ("on_train_batch_end",))
        self._call("on_train_batch_end", {"loss": loss}, data, last.index)
        if not steps_taken:
            return end_epoch
        self._write_step_logs(before)
        if self._val_source is not None and self._val_due_in_epoch(last, bool(chunk.sizes[-1]), state.global_step):
            self._run_validation()
        self._stop_if_interrupted()
        return end_epoch or state.should_stop or (self.max_steps != -1 and state.global_step >= self.max_steps)

    def _stacked_length(self, chunk: Chunk) -> int:
        """The leading axis of a chunk's stacked batches.

        Chunks of the run's usual batch shapes are padded to the sink length, so that the
        graph compiles once; a chunk of other shapes (a smaller last batch) keeps its own
        length (one more compile, as with sink_size=1).
        """
        if self._sink_shapes is None:
            self._sink_shapes = chunk.shapes
        return self._sink_length if chunk.shapes == self._sink_shapes else len(chunk.batches)

    def _write_step_logs(self, step_before: int) -> None:
        """Sends the step values of the optimizer steps after `step_before` that log_every_n_steps selects."""
        every = self.log_every_n_steps
        if not self.loggers or self.state.global_step // every == step_before // every:  # no multiple of it passed
            return
        steps = [s for s in range(step_before + 1, self.state.global_step + 1) if s % every == 0]
        if self._sink_length > 1:
            for step, values in self._metrics.read_sunk_steps(steps, step_before + 1):
                self._logger_write(values, step)
        else:
            self._logger_write(self._metrics.read_train_step(steps[0]))

    def _run_validation(self) -> None:
        self._eval_loop("validation", self._val_source, self.limit_val_batches)
        self._validation_runs += 1
        self.model.set_train(True)

    def _eval_loop(self, stage: str, source: DataSource, limit):
        """Runs one pass of validation, test or predict. Returns metrics, or outputs for predict."""
        model, metrics = self.model, self._metrics
        model.set_train(False)
        prefix = {"validation": "validation", "test": "test", "predict": "predict"}[stage]
        self.num_eval_batches = source.batch_count(limit)
        metrics.start_epoch(stage)
        for metric in module_metrics(self.model):
            metric.clear()  # e.g. updates of the sanity check do not count
        self._call(f"on_{prefix}_start")  # also while sanity checking, as Lightning does
        self._call(f"on_{prefix}_epoch_start")
        outputs = []
        for batch in source.batches(limit):
            self._call(f"on_{prefix}_batch_start", batch.data, batch.index)
            if stage not in self._eval_steps:
                self._eval_steps[stage] = self._build_eval_step(stage, batch)
            target = self._eval_log_targets[stage]
            if isinstance(target, HostLogs):
                target.current_batch_size = batch.size
            else:
                target.set_batch_size(batch.size)
            with inside_step(model, EVAL_HOOKS[stage], target):
                step = self._eval_steps[stage]
                # A compiled step takes an int32 Tensor, so a new index does not recompile it.
                index = Tensor(batch.index, ms.int32) if step.compiled else batch.index
                output = step(batch.data, index)
            if stage == "predict":
                outputs.append(output)
            self._call(f"on_{prefix}_batch_end", output, batch.data, batch.index)
        reported = not self.sanity_checking and stage != "predict"
        if reported:
            metrics.end_epoch(stage)  # before the hook: its callbacks see the epoch values, as in Lightning
        self._call(f"on_{prefix}_epoch_end")
        results: Dict[str, float] = {}
        if reported:
            logged = metrics.epoch_ended()
            if self.state.stage == "fit":
                self._logger_write(logged)
            results = {name: value for name, value in metrics.callback_metrics.items()
                       if name in self._stage_names(stage)}
        self._call(f"on_{prefix}_end")
        return outputs if stage == "predict" else results

    def _stage_names(self, stage: str) -> set:
        names = set()
        device = self._metrics.device.get(stage)
        options = list(device.options) if device is not None else []
        options += list(self._metrics.host[stage].options.values())
        for opt in options:
            names.update(opt.reported_names().values())
            names.add(opt.name)
        return names


def _all_finite(counters, weights):
    """A step-like function: whether the run's loss sum and `weights` are all finite (graph-parseable)."""
    weights = tuple(weights)

    def check():
        return ops.logical_and(ops.isfinite(counters.loss_sum), ms.amp.all_finite(weights))

    return check
