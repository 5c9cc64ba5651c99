"""`Trainer`: its arguments and public state.

What a run does is in `lightms/trainer/loop.py` (`fit` and its loops) and
`lightms/trainer/evaluation.py` (`validate`, `test`, `predict`); the compiled step is `lightms.engine`'s.
"""

import os
import warnings

from lightms._mindspore import mindspore as ms
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from lightms.checkpoint.io import write_checkpoint
from lightms.checkpoint.run_state import collect_run_state
from lightms.callbacks.model_checkpoint import ModelCheckpoint
from lightms.distributed.environment import ClusterEnvironment, resolve_environment, user_node_timeout
from lightms.distributed.strategy import DDPStrategy
from lightms.callbacks.timer import Timer
from lightms.loggers.logger import Logger
from lightms.module.cell import LightningCell
from lightms.precision.precision import check_backend, resolve_precision
from lightms.trainer import arguments as check
from lightms.trainer.hooks import call_hook
from lightms.trainer.loop import TrainingLoop
from lightms.trainer.metrics import MetricStore


@dataclass
class LoopState:
    """Where the run is. `global_step` counts optimizer steps, never micro-batches (under manual
    optimization: training_step calls, one per batch)."""

    current_epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    window: int = 0  # micro-batches in the open accumulation window
    epoch_done: bool = False  # the epoch's batches and validation are over (its end hooks run)
    schedulers_pending: bool = False  # the epoch is done but its host schedulers of interval "epoch" not stepped
    should_stop: bool = False
    stage: Optional[str] = None
    sanity_checking: bool = False
    world_size: int = 1  # data-parallel workers: batches_done counts each worker's share

    def state_dict(self) -> Dict[str, int]:
        """Where a checkpoint resumes: the epoch, the optimizer steps, the batches done in the epoch.

        Between epochs and inside an epoch's end hooks, that is the start of the next epoch.
        """
        mid_epoch = not self.epoch_done and self.batches_done > 0
        return {"epoch": self.current_epoch + 1 if self.epoch_done else self.current_epoch,
                "global_step": self.global_step, "batches_done": self.batches_done if mid_epoch else 0,
                "schedulers_pending": self.epoch_done and self.schedulers_pending, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int], window: int = 0, world_size: int = 1) -> None:
        """Continues from what `state_dict` returned, inside an accumulation window of `window` micro-batches.

        A checkpoint of a run on another number of data-parallel workers continues at the same place
        in the data: its workers had read `batches_done * its world size` batches of the epoch
        between them, so this run's workers skip that many between them. Exact for data split by
        batch and for sampler-sharded pipelines (rows dealt out in turn); a `.shuffle()` operation
        above a sharded source shuffles each worker's share its own way, which no mapping replays.

        Raises:
            ValueError: If that many batches cannot be split evenly over `world_size` workers, or the
                checkpoint was written inside an accumulation window by or for a data-parallel run.
        """
        saved_world, batches = state.get("world_size", 1), state["batches_done"]
        if window and max(saved_world, world_size) > 1:
            # Only rank 0's partial gradients are in the checkpoint: every other worker's would be lost.
            raise ValueError(f"The checkpoint was written inside an accumulation window, and this run or the one that "
                             f"wrote it ({saved_world} worker(s); this run has {world_size}) is data-parallel: "
                             "each worker's partial gradients are its own and only rank 0's were saved. Resume from a "
                             "checkpoint written at the end of a window.")
        if saved_world != world_size and batches:
            if batches * saved_world % world_size:
                raise ValueError(f"The checkpoint's {saved_world} worker(s) had read {batches * saved_world} batches "
                                 f"of the epoch, which {world_size} workers cannot split evenly; resume from a "
                                 "checkpoint written at an epoch end.")
            batches = batches * saved_world // world_size
        self.current_epoch, self.global_step = state["epoch"], state["global_step"]
        self.batches_done, self.window, self.epoch_done = batches, window, False
        self.schedulers_pending = state.get("schedulers_pending", False)


class Trainer(TrainingLoop):
    """Trains and evaluates a `LightningCell` with compiled MindSpore steps.

    All arguments are keyword-only. Steps are counted in optimizer steps:
    `max_steps`, `log_every_n_steps` and an int `val_check_interval` count
    updates, not micro-batches, whatever `accumulate` is.

    Args:
        max_epochs: Epochs to train; default 1000 when `max_steps` is -1, else unlimited (-1).
        max_steps: Optimizer steps to train; -1 for no limit.
        accumulate: Micro-batches whose gradients are averaged into one optimizer step.
            The last window of an epoch is stepped with the micro-batches it holds.
        sink_size: Micro-batches per host call (MindSpore's data and loop sinking): 1 runs
            one compiled step per micro-batch; N > 1 stacks N batches and runs them in a
            loop inside one graph; "epoch" sinks a whole epoch. Results equal sink_size=1
            exactly; an epoch is always one pass over the data. As with Keras'
            `steps_per_execution`, batch-level hooks run once per chunk:
            `on_train_batch_start(batch, batch_idx)` gets the chunk's batches (a `SunkBatches`
            sequence, each batch made when read) and its first index,
            `on_train_batch_end(outputs, batch, batch_idx)` its last index
            (`trainer.sink_batches` is the range of indices the chunk covers, and `outputs`
            what the last micro-batch returned). Step values logged inside a chunk still reach the
            loggers at every step `log_every_n_steps` selects. A chunk ends early after any
            optimizer step the host must see: `max_steps`, validation, a checkpoint
            callback's `every_n_train_steps`, a host-side scheduler with interval "step",
            `detect_anomaly`, and `Callback.needs_host_at_step`. Per chunk, not per step:
            `on_train_batch_start` returning -1, SIGINT/SIGTERM and `max_time` take effect
            after the running chunk. Batches must be a Tensor or a flat tuple/list/dict of
            Tensors. Ignored, with a warning, when compile=False.
        precision: "32-true" (default; also "32", 32, "O0"), "16-mixed" (also 16: float16
            per-operator autocast of the step hooks, float32 master weights, dynamic loss
            scaling), "bf16-mixed",
            "16-true", "bf16-true" (half-precision parameters), or MindSpore's levels "O1",
            "O2", "O3" (applied to the module's sub-cells). Under loss scaling, an overflowing
            optimizer step is skipped (weights, `global_step` and learning-rate schedules do not
            advance) and the scale halves; the host reads `global_step` after each step to know.
            A precision the backend cannot run raises here (see the README's table).
        limit_train_batches, limit_val_batches, limit_test_batches, limit_predict_batches:
            Batches per epoch: an int count, a float fraction, or None for all.
        val_check_interval: None or 1.0 to validate at epoch ends; a float < 1 to also
            validate that fraction of the way through each epoch; an int to validate every
            that many optimizer steps instead.
        check_val_every_n_epoch: Validate every n-th epoch (None: only by val_check_interval).
        num_sanity_val_steps: Validation batches run before training (-1 for all).
        fast_dev_run: True (or n) to run 1 (or n) batches of each loop, without loggers.
        log_every_n_steps: Send step values to the loggers every n optimizer steps.
        gradient_clip_val: Clip gradients (after averaging the window) at this value.
        gradient_clip_algorithm: "norm" (global L2 norm) or "value".
        default_root_dir: Folder for logs; default the working directory.
        compile: Run steps as compiled MindSpore graphs (True) or eagerly (False).
        seed: Seed MindSpore, datasets, numpy and random at the start of each run.
        callbacks: A Callback or a list of them.
        logger: True for a TensorBoardLogger under default_root_dir, False for none, a
            Logger or a list of Loggers.
        enable_progress_bar: Add a TQDMProgressBar unless one is in `callbacks`.
        max_time: Stop after this much training time ("DD:HH:MM:SS", a timedelta or a
            dict), via a Timer callback; checked after each optimizer step.
        detect_anomaly: Stop with an error at the first optimizer step whose training loss
            is NaN or infinite (costs one host sync per step). Off, lightms sums the
            losses on the device and warns once per fit, at the end of the first epoch
            with such a loss.
        enable_checkpointing: Add a ModelCheckpoint (last epoch's checkpoint under the
            logger's folder) unless one is in `callbacks`.
        plugins: `lightms.privacy.DPSGD(...)` (or a list holding it) for differentially
            private training: per-example clipping and noise in the compiled step.
        strategy: "auto" (single-process, or data-parallel when the script was started by
            msrun with several workers), "ddp" (data-parallel; needs msrun), or a
            `lightms.DDPStrategy(timeout=...)` (data-parallel with its options).
        devices: Workers per machine ("auto": what msrun started).
        num_nodes: Machines.
        accelerator: "auto", "cpu", "gpu" or "ascend": MindSpore's device target.

    Raises:
        TypeError, ValueError: For an argument of the wrong type or out of range,
            naming the argument.
    """

    def __init__(
        self,
        *,
        max_epochs: Optional[int] = None,
        max_steps: int = -1,
        accumulate: int = 1,
        sink_size=1,
        precision="32-true",
        limit_train_batches=None,
        limit_val_batches=None,
        limit_test_batches=None,
        limit_predict_batches=None,
        val_check_interval=None,
        check_val_every_n_epoch: Optional[int] = 1,
        num_sanity_val_steps: int = 2,
        fast_dev_run=False,
        log_every_n_steps: int = 50,
        gradient_clip_val=None,
        gradient_clip_algorithm: str = "norm",
        default_root_dir=None,
        compile: bool = True,
        seed: Optional[int] = None,
        callbacks=None,
        logger=True,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
        max_time=None,
        detect_anomaly: bool = False,
        plugins=None,
        strategy: Union[str, DDPStrategy] = "auto",
        devices="auto",
        num_nodes: int = 1,
        accelerator: str = "auto",
    ):
        self.max_steps = check.check_int("max_steps", max_steps, -1)
        max_epochs = check.check_int("max_epochs", max_epochs, -1, allow_none=True)
        if max_epochs is None:
            max_epochs = 1000 if self.max_steps == -1 else -1
        self.max_epochs = max_epochs
        self.accumulate = check.check_int("accumulate", accumulate, 1)
        self.sink_size = check.check_sink_size(sink_size)
        self.precision = resolve_precision(precision)
        check_backend(self.precision)
        self.limit_train_batches = check.check_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = check.check_limit("limit_val_batches", limit_val_batches)
        self.limit_test_batches = check.check_limit("limit_test_batches", limit_test_batches)
        self.limit_predict_batches = check.check_limit("limit_predict_batches", limit_predict_batches)
        self.val_check_interval = check.check_val_check_interval(val_check_interval)
        self.check_val_every_n_epoch = check.check_int("check_val_every_n_epoch", check_val_every_n_epoch, 1,
                                                       allow_none=True)
        if self.check_val_every_n_epoch is None and not isinstance(self.val_check_interval, int):
            raise ValueError("Trainer(check_val_every_n_epoch=None) needs an int val_check_interval "
                             "(validate every that many optimizer steps).")
        self.num_sanity_val_steps = check.check_int("num_sanity_val_steps", num_sanity_val_steps, -1)
        if isinstance(fast_dev_run, bool):
            self.fast_dev_run = int(fast_dev_run)
        else:
            self.fast_dev_run = check.check_int("fast_dev_run", fast_dev_run, 0)
        self.log_every_n_steps = check.check_int("log_every_n_steps", log_every_n_steps, 1)
        self.gradient_clip_val = check.check_number("gradient_clip_val", gradient_clip_val, 0.0)
        self.gradient_clip_algorithm = check.check_choice("gradient_clip_algorithm", gradient_clip_algorithm,
                                                          ("norm", "value"))
        if default_root_dir is not None and not isinstance(default_root_dir, (str, os.PathLike)):
            raise TypeError(f"Trainer(default_root_dir=...) must be a path, got {default_root_dir!r}.")
        self.default_root_dir = os.fspath(default_root_dir) if default_root_dir is not None else os.getcwd()
        self.compile = check.check_bool("compile", compile)
        self.seed = check.check_int("seed", seed, 0, allow_none=True)
        check.check_bool("enable_progress_bar", enable_progress_bar)
        self.enable_checkpointing = check.check_bool("enable_checkpointing", enable_checkpointing)
        self.detect_anomaly = check.check_bool("detect_anomaly", detect_anomaly)
        if self.sink_size != 1 and not self.compile:
            warnings.warn(f"Trainer(sink_size={self.sink_size!r}, compile=False): sinking needs compiled steps; "
                          "this Trainer runs one eager step per micro-batch.", stacklevel=2)

        if self.fast_dev_run:
            n = self.fast_dev_run
            self.max_epochs, self.max_steps, self.num_sanity_val_steps = 1, n, 0
            self.limit_train_batches = self.limit_val_batches = n
            self.limit_test_batches = self.limit_predict_batches = n
            self.val_check_interval, self.check_val_every_n_epoch = None, 1
            logger = False

        # How long the workers may wait for each other (MindSpore's collectives and the watchdog): the strategy's
        # timeout, else MS_NODE_TIMEOUT if the user set it, else DDPStrategy's default.
        if isinstance(strategy, DDPStrategy):
            self.strategy, self.ddp = "ddp", strategy
        else:
            self.strategy = check.check_choice("strategy", strategy, ("auto", "ddp"))
            timeout = user_node_timeout()
            self.ddp = DDPStrategy(timeout) if timeout is not None else DDPStrategy()
        if devices != "auto":
            devices = check.check_int("devices", devices, 1)
        self.num_nodes = check.check_int("num_nodes", num_nodes, 1)
        self.accelerator = check.check_choice("accelerator", accelerator, ("auto", "cpu", "gpu", "ascend"))
        if self.accelerator != "auto":
            ms.set_device({"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}[self.accelerator])
        self.cluster = resolve_environment(self.strategy, devices, self.num_nodes, self.ddp.timeout) \
            or ClusterEnvironment()
        if not self.cluster.is_global_zero:  # loggers and the progress bar run on rank 0 only
            logger, enable_progress_bar = False, False
            if callbacks is not None:
                from lightms.callbacks.progress import TQDMProgressBar

                given = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
                callbacks = [cb for cb in given if not isinstance(cb, TQDMProgressBar)]
        self.privacy = check.check_plugins(plugins)
        if self.privacy is not None:
            callbacks = ([] if callbacks is None else [callbacks] if not isinstance(callbacks, (list, tuple))
                         else list(callbacks)) + [self.privacy]
        self.callbacks = check.build_callbacks(callbacks, enable_progress_bar, self.enable_checkpointing)
        if max_time is not None:
            self.callbacks = sorted(self.callbacks + [Timer(max_time)], key=lambda cb: cb.order)
        self.loggers = check.build_loggers(logger, self.default_root_dir)
        self.state = LoopState()
        self.model: Optional[LightningCell] = None
        self.optimizers: List[Any] = []
        self.lr_scheduler_configs: List[Any] = []  # the host-side schedulers of the last fit (SchedulerConfig)
        self.num_training_batches: Optional[int] = None
        self.num_eval_batches: Optional[int] = None
        self.interrupted = False
        self.sink_batches = range(0)
        # What a run builds (see loop.py), kept after it for inspection and checkpoints.
        self._metrics = MetricStore(self.cluster.world_size)
        self._binding = None  # engine.binding.ModuleBinding
        self._counters = None  # engine.engine.Counters
        self._engine = None  # engine.engine.TrainEngine, built at the first training chunk
        self._pending_engine_state = None  # a checkpoint's engine state, loaded once the engine is built
        self._planner = None  # trainer.chunks.ChunkPlanner
        self._eval_steps = {}
        self._train_source = self._val_source = None
        self.ckpt_path: Optional[str] = None  # the checkpoint the last fit resumed from (as Lightning's)
        self._hook_receivers = {}
        self._extra_host_reads = 0
        self._interrupt_signal: Optional[int] = None
        self._stop_agreed = False  # data parallelism: the workers agreed to stop (modes.agree_on_stopping)
        self._watchdog = None  # data parallelism: ends this worker when the others stop answering (during fit)
        self._validation_runs = 0  # validations (not sanity checks) in the current or last fit
        self._finite_check = None

    # ---- public state -------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Workers in the run (1 without data parallelism)."""
        return self.cluster.world_size

    @property
    def global_rank(self) -> int:
        """This worker's rank among all workers."""
        return self.cluster.global_rank

    @property
    def local_rank(self) -> int:
        """This worker's rank on its machine."""
        return self.cluster.local_rank

    @property
    def is_global_zero(self) -> bool:
        """Whether this is rank 0, which writes logs and checkpoints."""
        return self.cluster.is_global_zero

    @property
    def logger(self) -> Optional[Logger]:
        """The first logger, or None."""
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        """The first logger's folder, or default_root_dir."""
        return (self.logger.log_dir if self.logger is not None else None) or self.default_root_dir

    @property
    def current_epoch(self) -> int:
        """Finished epochs (the epoch in progress, 0-based)."""
        return self.state.current_epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return self.state.global_step

    @property
    def should_stop(self) -> bool:
        """Set True (e.g. from a callback) to end fit after the current optimizer step."""
        return self.state.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.state.should_stop = bool(value)

    @property
    def has_validation(self) -> bool:
        """Whether the running fit validates."""
        return self._val_source is not None

    @property
    def sanity_checking(self) -> bool:
        """Whether the sanity validation is running."""
        return self.state.sanity_checking

    @property
    def callback_metrics(self) -> Dict[str, float]:
        """The latest logged values as Python floats (reads the device if a step is unread).

        In epoch-end hooks they include the epoch's values, and what earlier hooks logged there.
        """
        self._read_step_values()
        self._metrics.refresh_epoch()
        return self._metrics.callback_metrics

    @property
    def logged_metrics(self) -> Dict[str, float]:
        """The values last sent to the loggers."""
        return self._metrics.logged_metrics

    @property
    def progress_bar_metrics(self) -> Dict[str, float]:
        """The `prog_bar=True` values (reads the device if a step is unread and some name has prog_bar=True)."""
        if self._metrics.has_progress_bar_names():  # else the bar listens to nothing: no host sync
            self._read_step_values()
        return self._metrics.progress_bar_metrics

    @property
    def host_sync_count(self) -> int:
        """Device-to-host reads lightms made for logged values in this Trainer."""
        return self._metrics.host_reads + self._extra_host_reads

    @property
    def estimated_stepping_batches(self) -> float:
        """Optimizer steps this fit will take (inf if unknown)."""
        per_epoch = float("inf")
        if self.num_training_batches is not None:
            per_epoch = -(-self.num_training_batches // self.accumulate)
        by_epochs = per_epoch * self.max_epochs if self.max_epochs != -1 else float("inf")
        if self.max_steps != -1:
            return min(self.max_steps, by_epochs)
        return by_epochs

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, filepath, weights_only: bool = False) -> None:
        """Writes a checkpoint of the running fit (atomically) in MindSpore's `.ckpt` format.

        Args:
            filepath: Destination path.
            weights_only: Store only the module's parameters and hyperparameters.

        Raises:
            RuntimeError: If no model is attached (call it during or after `fit`).
        """
        if self.model is None:
            raise RuntimeError("Trainer.save_checkpoint needs a model: call it during or after fit.")
        engine = self._engine.state_dict(self.state.window) if self._engine is not None else self._pending_engine_state
        parameters, meta = collect_run_state(self.model, weights_only, self.optimizers, self.lr_scheduler_configs,
                                             self.state, engine, self.callbacks)
        if not weights_only:
            self.model.on_save_checkpoint(meta)
        if self.is_global_zero:  # every rank holds the same state: rank 0 writes it
            write_checkpoint(os.fspath(filepath), parameters, meta)

    @property
    def checkpoint_callback(self) -> Optional[ModelCheckpoint]:
        """The first ModelCheckpoint callback, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)

    def _resolve_ckpt_path(self, ckpt_path) -> Optional[str]:
        if ckpt_path is None:
            return None
        if ckpt_path in ("last", "best") and self.world_size > 1:
            raise ValueError(f'ckpt_path="{ckpt_path}" with {self.world_size} data-parallel workers: only rank 0 knows '
                             "its checkpoint folder; pass the checkpoint's path (every worker can read it).")
        if ckpt_path in ("last", "best"):
            callback = self.checkpoint_callback
            if callback is None:
                raise ValueError(f'ckpt_path="{ckpt_path}" needs a ModelCheckpoint callback in the Trainer.')
            path = callback.find_checkpoint(ckpt_path, self)
            if path is None:
                where = ("this Trainer's ModelCheckpoint has no best checkpoint yet (it knows one once it saved, "
                         "or resumed, with a monitor)" if ckpt_path == "best" else f"looked in {callback.searched(self)}")
                raise ValueError(f'ckpt_path="{ckpt_path}": no such checkpoint; {where}.')
            return path
        if not isinstance(ckpt_path, (str, os.PathLike)):
            raise TypeError(f"ckpt_path must be a path, 'last' or 'best', got {ckpt_path!r}.")
        return os.fspath(ckpt_path)

    @property
    def validation_has_run(self) -> bool:
        """Whether validation (not the sanity check) has run in the current or last fit."""
        return self._validation_runs > 0

    def describe_missing_metric(self, name: str) -> str:
        """Says why `name` is not in `callback_metrics` as far as the trainer can tell, for error messages.

        Returns:
            The names available, and, when validation has not run yet in this fit, why.
        """
        text = f"Available: {sorted(self.callback_metrics)}."
        if self.state.stage == "fit" and not self.validation_has_run:
            if self._val_source is None:
                text += " This fit does not validate (no val_dataloaders, or limit_val_batches=0)."
            else:
                when = (f"every {self.val_check_interval} optimizer steps (now at step {self.global_step})"
                        if isinstance(self.val_check_interval, int) else
                        f"every {self.check_val_every_n_epoch} epoch(s) (now in epoch {self.current_epoch})")
                text += f" Validation has not run yet in this fit: it runs {when}."
        return text

    def _call(self, hook: str, *args) -> Any:
        """Calls `hook` on the callbacks and the module, in `order` (see `lightms.trainer.hooks`)."""
        return call_hook(self, hook, *args)

    def _logger_write(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        if metrics:
            if self.state.stage == "fit":
                metrics = {**metrics, "epoch": float(self.state.current_epoch)}  # as Lightning does
            for lg in self.loggers:
                lg.log_metrics(metrics, step=self.state.global_step if step is None else step)

    def _read_step_values(self) -> None:
        if self.state.stage == "fit":
            self._metrics.read_train_step(self.state.global_step)
