"""The run: `fit` and its loops, and what every run shares (`_run`: binding, setup, teardown).

Mixed into `Trainer`, which holds the arguments and the public state (validate, test and
predict: `evaluation.py`). A fit reads
top-down: epochs; in each, the chunks `ChunkPlanner` cuts; for each chunk the batch
hooks, `engine.run(chunk)`, bookkeeping, schedulers, step logs, validation and stop
checks. What the device computes is the engine's (`lightms.engine`); host reads of
device values happen only where marked (logging steps, epoch ends, `detect_anomaly`).
"""

import sys
import warnings
from typing import Optional

from lightms._mindspore import GraphDumpGuard
from lightms.checkpoint.run_state import restore_run_state
from lightms.distributed.watchdog import explain_collective_failure
from lightms.engine.binding import ModuleBinding
from lightms.engine.engine import Counters, TrainEngine
from lightms.engine.explain import explain_graph_failure
from lightms.engine.plan import frozen_parameters, plan_training
from lightms.module.cell import LightningCell
from lightms.module.device_logs import DeviceLogBuffers
from lightms.module.logging import LogOptions
from lightms.precision.precision import warn_half_optimizer
from lightms.trainer.chunks import Chunk, ChunkPlanner, resolve_sink_length
from lightms.trainer.data import DataSource, fit_sources
from lightms.trainer.evaluation import EvaluationLoop
from lightms.trainer.hooks import hook_receivers
from lightms.trainer.interrupts import Interrupted, stop_if_interrupted, stop_requests
from lightms.trainer.anomaly import check_nonfinite
from lightms.trainer.modes import (agree_on_stopping, check_manual_optimization, check_per_example_loss,
                                   check_privacy, start_data_parallel)
from lightms.trainer.optimizers import name_optimizer_states, read_optimizer_config, step_schedulers
from lightms.trainer.seed import seed_everything

class TrainingLoop(EvaluationLoop):
    """The run half of `Trainer` (a mixin: it uses the Trainer's arguments, state and hooks); validate, test
    and predict and the evaluation pass come from `EvaluationLoop`."""

    # ---- entry points -------------------------------------------------------------------
    def fit(self, model: LightningCell, train_dataloaders=None, val_dataloaders=None, datamodule=None,
            ckpt_path=None) -> None:
        """Trains `model`, validating as configured.

        Args:
            model: The LightningCell.
            train_dataloaders: Training batches (a batched Dataset or an iterable).
            val_dataloaders: Validation batches, or None.
            datamodule: A LightningDataModule instead of the two loaders.
            ckpt_path: Resume from this checkpoint: a path, "last" or "best" (of the
                ModelCheckpoint callback). The run continues exactly where it stopped.

        Raises:
            ValueError: If no training data is given, both loaders and a datamodule are,
                the training data is empty, or the checkpoint does not fit.
            SystemExit: After SIGINT/SIGTERM, once the step is finished and the checkpoint written
                (code 128 + signal).
        """
        self._check_model(model)
        self.ckpt_path = self._resolve_ckpt_path(ckpt_path)
        train, val = fit_sources(self, datamodule, train_dataloaders, val_dataloaders)
        if train is None:
            raise ValueError("Trainer.fit needs training data: pass train_dataloaders or a datamodule whose "
                             "train_dataloader() returns batches.")
        self._interrupt_signal, self.interrupted, self._stop_agreed = None, False, False
        try:
            with stop_requests(self._request_stop):
                self._run("fit", model, lambda: self._fit(train, val))
                if self._interrupt_signal is not None:  # arrived in teardown: fit is done, its checkpoints too
                    print(f"lightms: SIGINT/SIGTERM received after training ended (step {self.global_step}); "
                          "exiting.", file=sys.stderr)
                    raise Interrupted(self._interrupt_signal)
        except Interrupted as interruption:
            self.interrupted = True
            raise SystemExit(128 + interruption.signum) from None

    # ---- scaffolding ----------------------------------------------------------------------
    def _run(self, stage: str, model: LightningCell, body) -> None:
        """Binds the model, runs `body` with setup/teardown around it, and always unbinds."""
        if self.seed is not None:
            seed_everything(self.seed)
        self.model = model
        self.precision.apply(model)
        self._counters = Counters()
        self._counters.set(self.state.current_epoch, self.state.global_step)
        self._metrics.start_run()
        self._engine, self._eval_steps = None, {}
        self._hook_receivers = {}  # hook -> who receives it, for this run's model
        self.state.stage = stage
        status = "failed"
        dump_guard = GraphDumpGuard(self.global_rank)
        binding = self._binding = ModuleBinding(model, self, LightningCell)
        try:
            with binding:
                binding.use_counters(self._counters)
                if stage == "fit":
                    binding.start_training()  # before setup: modes the user sets from there on are kept
                self._call("setup", stage)
                body()
                status = "success"
                self._call("teardown", stage)
        except BaseException as exception:
            if isinstance(exception, Interrupted):
                status = "interrupted"
            moved = dump_guard.tidy()
            if moved:
                warnings.warn(f"MindSpore's compile report (rank_{self.global_rank}/om/analyze_fail.ir) was moved out "
                              f"of the working directory to {moved}.", stacklevel=3)
            failure = explain_collective_failure(
                exception, self.global_rank, f"epoch {self.state.current_epoch}, step {self.state.global_step}",
                self.ddp.timeout) if self.world_size > 1 else None
            for cb in self.callbacks:
                cb.on_exception(self, model, failure or exception)
            if failure is not None:
                raise failure from exception
            raise
        finally:
            if stage == "fit":  # (not a validate() called inside fit)
                self._stop_watchdog()
            for lg in self.loggers:
                lg.finalize(status)
            if self._planner is not None:
                self._planner.release()
            self.state.stage = None

    def _explainer(self, hook: str):
        """What a new step graph of `hook` calls when it fails (`explain.explain_graph_failure`)."""
        return lambda error: explain_graph_failure(self.model, LightningCell, hook, error)

    # ---- fit ----------------------------------------------------------------------------
    def _fit(self, train: DataSource, val: Optional[DataSource]) -> None:
        model, state = self.model, self.state
        state.world_size = self.world_size
        if not model.automatic_optimization:
            check_manual_optimization(self)
        if self.privacy is not None:
            check_privacy(self)
        config = read_optimizer_config(model.configure_optimizers(), type(model).__name__,
                                       automatic=model.automatic_optimization)
        name_optimizer_states(config.optimizers, model)
        self.optimizers, self.lr_scheduler_configs = list(config.optimizers), config.schedulers
        self._binding.use_optimizers(self.optimizers, [c.scheduler for c in config.schedulers], self.world_size)
        for optimizer in self.optimizers:
            warn_half_optimizer(self.precision, optimizer)
        self._pending_engine_state = None
        if self.ckpt_path is not None:
            self._pending_engine_state = restore_run_state(self, self.ckpt_path)
            train.resume_at(state.current_epoch, state.batches_done)
            self._counters.set(state.current_epoch, state.global_step)  # the restored values
            if state.schedulers_pending:  # written in the last epoch's end hooks, before its schedulers stepped
                self._step_schedulers("epoch", state.current_epoch, resuming=True)
        self._train_source = train
        if self.world_size > 1:
            from lightms.distributed.watchdog import Watchdog

            self._watchdog = Watchdog(self.ddp.timeout, self.global_rank).start()  # before the first collective
            start_data_parallel(self, train)
        self.num_training_batches = train.batch_count(self.limit_train_batches)
        if self.num_training_batches == 0:
            if train.length() == 0:
                raise ValueError("train_dataloaders yielded no batches: the dataset is empty.")
            raise ValueError(f"Trainer(limit_train_batches={self.limit_train_batches}) leaves no training batches.")
        sink_length = resolve_sink_length(self.sink_size, self.num_training_batches) if self.compile else 1
        self._planner = ChunkPlanner(self.accumulate, sink_length, self._host_needed_after,
                                     lambda: self.state.global_step, sink_size=self.sink_size)
        has_val = val is not None and self.limit_val_batches != 0 and callable(getattr(model, "validation_step", None))
        self._val_source = val if has_val else None
        if has_val:
            val.check_whole(self.world_size)
        self._validation_runs = 0
        self._finite_check = None  # built at the first check, over this run's trainable parameters
        self._check_validation_can_run()
        self._warn_unsinkable_steps()
        if model.hparams:
            for lg in self.loggers:
                lg.log_hyperparams(dict(model.hparams))
        self._call("on_fit_start")
        if self._val_source is not None and self.num_sanity_val_steps != 0:
            state.sanity_checking = True
            self._call("on_sanity_check_start")
            limit = None if self.num_sanity_val_steps == -1 else self.num_sanity_val_steps
            self._eval_loop("validation", self._val_source, limit)
            self._progressed("the sanity check")
            self._call("on_sanity_check_end")
            state.sanity_checking = False
        self._call("on_train_start")
        while not self._fit_done():
            self._train_epoch()
            state.current_epoch, state.batches_done, state.epoch_done = state.current_epoch + 1, 0, False
            agree_on_stopping(self)
            stop_if_interrupted(self)  # a signal during the epoch's validation or end hooks
        self._call("on_train_end")
        self._call("on_fit_end")
        agree_on_stopping(self)
        stop_if_interrupted(self)
        self._stop_watchdog()  # no collective is left: a long teardown on one worker is no failure

    def _train_epoch(self) -> None:
        state, metrics = self.state, self._metrics
        metrics.start_epoch("train")
        self._restore_epoch_logs()
        self._counters.set_epoch(state.current_epoch)
        state.epoch_done = False
        self._call("on_train_epoch_start")
        if self._engine is not None and not self._engine.plan.manual and \
                self._engine.plan.frozen != frozen_parameters(self.optimizers[0]):
            self._engine = self._build_engine(previous=self._engine)  # requires_grad changed (a fine-tuning callback)
        batches = self._train_source.batches(self.limit_train_batches)
        for chunk in self._planner.chunks(batches, state.window):
            if self._run_chunk(chunk):
                break
        if self._val_due_at_epoch_end():
            self._run_validation()
        if not self.detect_anomaly:
            check_nonfinite(self)
        state.epoch_done = state.schedulers_pending = True
        self._read_step_values()
        # Read before on_train_epoch_end, so its callbacks (checkpoints, early stopping) can monitor epoch values.
        metrics.end_epoch("train")
        self._call("on_train_epoch_end")
        self._logger_write(metrics.epoch_ended())
        self._step_schedulers("epoch", state.current_epoch + 1)
        state.schedulers_pending = False
        if self._pending_engine_state is not None:  # a resumed epoch's logged sums belong to it alone
            self._pending_engine_state = (self._pending_engine_state[0], {})

    def _restore_epoch_logs(self) -> None:
        """After a resume into an epoch: its logged sums so far, in buffers of the saved names, until the engine
        (built at the epoch's first chunk, which takes them over) exists; an epoch with nothing left to train
        reports them too."""
        logs = (self._pending_engine_state or ({}, {}))[1].get("logs")
        if logs is not None and self._engine is None:
            buffers = DeviceLogBuffers([LogOptions(**options) for options in logs["options"]],
                                       world_size=self.world_size)
            buffers.load_state_dict(logs)
            self._metrics.device["train"] = buffers

    def _build_engine(self, batch=None, previous: Optional[TrainEngine] = None) -> TrainEngine:
        """Plans the training step on the first batch (its dry run) and builds the engine's graphs.

        A rebuild (`previous`: the trainable parameters changed) keeps the plan's other parts
        and carries the device state over.
        """
        optimizer = self.optimizers[0]
        if previous is not None:
            batch, plan = previous.example, previous.plan.with_frozen(frozen_parameters(optimizer))
        else:
            if self.privacy is not None:
                check_per_example_loss(self, batch)
            plan = plan_training(self.model, batch, self.optimizers, accumulate=self.accumulate,
                                 sink_length=self._planner.sink_length, clip_val=self.gradient_clip_val,
                                 clip_algorithm=self.gradient_clip_algorithm, precision=self.precision,
                                 step_history=bool(self.loggers), compile=self.compile, privacy=self.privacy,
                                 world_size=self.world_size)
        scaler = previous.loss_scaler if previous is not None else self.precision.loss_scaler()
        example_step = None
        if self.privacy is not None:
            example_step = self._binding.silent_twin(self._counters).training_step
        engine = TrainEngine(self.model, optimizer, plan, self._counters, self._binding.inside, batch,
                             self.precision.autocast, scaler, self._explainer("training_step"), example_step)
        self._metrics.device["train"] = engine.logs
        state = previous.state_dict(self.state.window) if previous is not None else self._pending_engine_state
        if state is not None:
            tensors, rest = state
            engine.load_state_dict({name: value.asnumpy() for name, value in tensors.items()}, rest)
        self._pending_engine_state = None
        return engine

    def _run_chunk(self, chunk: Chunk) -> bool:
        """Trains on a chunk (one host call when sinking) and does what follows its steps.

        Returns:
            Whether the epoch must end (a hook returned -1, should_stop, max_steps).
        """
        state = self.state
        first, last = chunk.batches[0], chunk.batches[-1]
        self._progressed("epoch %d, batch %d", state.current_epoch, first.index)  # formatted only if reported
        state.batch_idx = first.index
        self.sink_batches = range(first.index, last.index + 1)
        end_epoch = False
        if self._call("on_train_batch_start", chunk.hook_batches(), first.index) == -1:
            if not state.window:
                return True
            # Ending now would leave gradients in the accumulators: finish the window first.
            warnings.warn("on_train_batch_start returned -1 inside an accumulation window; lightms "
                          "finishes the window, then ends the epoch.", stacklevel=3)
            chunk.cut_after_first()
            last, end_epoch = first, True
            self.sink_batches = range(first.index, first.index + 1)
        if self._engine is None:
            self._engine = self._build_engine(first)
        report = self._engine.run(chunk)
        before = state.global_step
        state.batches_done, state.window = last.index + 1, chunk.window
        state.global_step += report.steps
        if self.lr_scheduler_configs and self.model.automatic_optimization:
            for step in range(before + 1, state.global_step + 1):
                self._step_schedulers("step", step)
        if chunk.steps and self.detect_anomaly:
            check_nonfinite(self)
        self._call("on_train_batch_end", report.outputs, chunk.hook_batches(), last.index)
        if report.steps:  # (none when loss scaling skipped the chunk's steps)
            self._write_step_logs(before)
        if self._val_source is not None and self._val_due_in_epoch(last, bool(chunk.sizes[-1]), state.global_step,
                                                                    stepped=bool(report.steps)):
            self._run_validation()
        if state.window:  # a stop (a signal, should_stop) waits for the window's optimizer step
            return end_epoch
        agree_on_stopping(self)
        stop_if_interrupted(self)
        return end_epoch or state.should_stop or (self.max_steps != -1 and state.global_step >= self.max_steps)

    def _write_step_logs(self, step_before: int) -> None:
        """Sends the step values of the optimizer steps after `step_before` that log_every_n_steps selects."""
        every = self.log_every_n_steps
        if not self.loggers or self.state.global_step // every == step_before // every:  # no multiple of it passed
            return
        steps = [s for s in range(step_before + 1, self.state.global_step + 1) if s % every == 0]
        if self._planner.sink_length > 1:
            for step, values in self._metrics.read_sunk_steps(steps, step_before + 1):
                self._logger_write(values, step)
        else:
            self._logger_write(self._metrics.read_train_step(steps[0]))

    # ---- when the host must act -------------------------------------------------------------
    def _fit_done(self) -> bool:
        if self.state.should_stop:
            return True
        if self.max_steps != -1 and self.state.global_step >= self.max_steps:
            return True
        return self.max_epochs != -1 and self.state.current_epoch >= self.max_epochs

    def _host_needed_after(self, step: int, batch) -> bool:
        """Whether the host must act right after optimizer step `step` (so a sunk chunk ends there)."""
        if self.detect_anomaly or (self.max_steps != -1 and step >= self.max_steps):
            return True
        if self._val_source is not None and self._val_due_in_epoch(batch, True, step):
            return True
        if self.model.automatic_optimization and any(config.interval == "step" and config.due(step)
                                                     for config in self.lr_scheduler_configs):
            return True
        # Asked for every batch of a chunk: only callbacks that override the default (False) are asked.
        receivers = hook_receivers(self, "needs_host_at_step")
        return any(cb.needs_host_at_step(self, step) for cb in receivers.before + receivers.after)

    def _val_due_at_epoch_end(self) -> bool:
        if self._val_source is None or isinstance(self.val_check_interval, int):
            return False
        return (self.state.current_epoch + 1) % self.check_val_every_n_epoch == 0

    def _val_due_in_epoch(self, batch, closed_window: bool, step: int, stepped: bool = True) -> bool:
        """Whether validation runs after `batch`, which took the run to optimizer step `step`.

        `stepped`: whether optimizer steps happened (not when loss scaling skipped them): an int
        interval counts steps, so a skipped one does not validate again at the same step.
        """
        if self._val_source is None or not closed_window:  # never inside an accumulation window
            return False
        interval = self.val_check_interval
        if isinstance(interval, int):
            if not stepped:
                return False
            epoch_ok = self.check_val_every_n_epoch is None or \
                (self.state.current_epoch + 1) % self.check_val_every_n_epoch == 0
            return epoch_ok and step % interval == 0
        if interval is None or interval == 1.0 or batch.is_last or self.num_training_batches is None:
            return False
        every = max(1, int(self.num_training_batches * interval))
        return (batch.index + 1) % every == 0 and self._val_due_at_epoch_end()

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

    def _warn_unsinkable_steps(self) -> None:
        """Says once, loudly, when the configuration makes every optimizer step end a sunk chunk."""
        if self._planner.sink_length == 1:
            return
        reasons = []
        if self.detect_anomaly:
            reasons.append("detect_anomaly=True checks the loss after every optimizer step")
        if self.model.automatic_optimization and any(config.interval == "step" and config.frequency == 1
                                                     for config in self.lr_scheduler_configs):
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
                          "per host call.", stacklevel=5)

    def _step_schedulers(self, interval: str, count: int, resuming: bool = False) -> None:
        """Steps the host-side schedulers due after `count` optimizer steps or epochs.

        `resuming`: the epoch step a checkpoint written in an epoch's end hooks missed. A plateau
        scheduler is not stepped then (the value it monitors is not in the checkpoint), as in Lightning.
        Under manual optimization training_step's author steps them (`self.lr_schedulers()`), as in Lightning.
        """
        if self.lr_scheduler_configs and self.model.automatic_optimization:
            step_schedulers(self.lr_scheduler_configs, interval, count, lambda: self.callback_metrics,
                            plateau=not resuming)

    # ---- interrupts -----------------------------------------------------------------------------
    def _request_stop(self, signum: int) -> None:
        self._interrupt_signal = signum

    # ---- evaluation -------------------------------------------------------------------------
    def _run_validation(self) -> None:
        self._eval_loop("validation", self._val_source, self.limit_val_batches)
        self._validation_runs += 1
        self._progressed(f"epoch {self.state.current_epoch}, after validation")

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _progressed(self, where: str, *args) -> None:
        """Tells the data-parallel watchdog that this worker got past `where % args` (no-op in one process)."""
        if self._watchdog is not None:
            self._watchdog.beat(where, *args)
