"""`ModelCheckpoint`: full-state checkpoints on a schedule, keeping the top k by a metric.

Which files a run may touch: a run resumed into the checkpoint folder it resumed
from continues that run, keeping and pruning its top-k exactly as the
uninterrupted run would have; any other run never deletes or overwrites a file
it did not write itself (a new name gets `-vN`).
"""

import glob
import math
import os
import re
import warnings
from typing import Dict, List, Optional

from lightms.callbacks.callback import Callback
from lightms.checkpoint.io import remove_stale_temporaries

_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


def format_checkpoint_name(template: str, values: Dict[str, float]) -> str:
    """Fills `{name}` / `{name:fmt}` fields with `name=value`, as Lightning's auto_insert_metric_name.

    Raises:
        KeyError: If a field names a value that is not available.
    """
    def fill(match):
        name, fmt = match.group(1), match.group(2) or ""
        if name not in values:
            raise KeyError(name)
        return f"{name}={format(values[name], fmt[1:])}"

    return _FIELD.sub(fill, template)


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


class ModelCheckpoint(Callback):
    """Saves full checkpoints (weights, optimizer, loop, callbacks) that resume a run exactly.

    Steps are optimizer steps. Without `every_n_train_steps` or `every_n_epochs`, it
    saves at the end of every epoch (after its validation). With `monitor`, it keeps
    the `save_top_k` best files by that metric; without, the latest `save_top_k`.
    Files are written atomically with a CRC32. An existing file that this run did not
    write is never overwritten or deleted: a new file gets a `-vN` suffix instead
    (`last-v1.ckpt` too). A run resumed from a checkpoint continues the old run's
    top-k (and may prune its files) only when it writes into the same folder.

    Args:
        dirpath: Folder; default `<logger version folder>/checkpoints` (or
            `<default_root_dir>/checkpoints` without a logger).
        filename: Template such as "{epoch}-{val_loss:.2f}"; default "{epoch}-{step}".
        monitor: Metric name in `trainer.callback_metrics` to rank by; None ranks by recency.
            Until the run's first validation has run, a validation metric is missing: the
            top-k save is skipped then, with a warning (as Lightning).
        mode: "min" or "max".
        save_top_k: How many to keep; -1 keeps all, 0 none (only `last`).
        save_last: Also write `last.ckpt` at each save.
        every_n_train_steps: Save every n optimizer steps.
        every_n_epochs: Save every n epochs.
        save_weights_only: Store only weights and hyperparameters.

    Raises:
        ValueError: For a bad mode, save_top_k < -1, or both schedules set.
    """

    order = 200  # after the module's hook: sees what it logged at epoch end, as Lightning's monitoring callbacks
    CHECKPOINT_EXTENSION = ".ckpt"

    def __init__(self, dirpath=None, filename: Optional[str] = None, monitor: Optional[str] = None,
                 mode: str = "min", save_top_k: int = 1, save_last: Optional[bool] = None,
                 every_n_train_steps: Optional[int] = None, every_n_epochs: Optional[int] = None,
                 save_weights_only: bool = False):
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode=...) must be 'min' or 'max', got {mode!r}.")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k=...) must be an int >= -1, got {save_top_k!r}.")
        if every_n_train_steps and every_n_epochs:
            raise ValueError("ModelCheckpoint: every_n_train_steps and every_n_epochs are mutually exclusive.")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"ModelCheckpoint({name}=...) must be an int >= 0, got {value!r}.")
        self._dirpath_given = dirpath is not None
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename or "{epoch}-{step}"
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if every_n_train_steps else 1)
        self.save_weights_only = save_weights_only
        self.best_k_models: Dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: Optional[float] = None
        self.last_model_path = ""
        self._latest: List[str] = []  # the kept files, oldest first, when ranking by recency (save_top_k > 0)
        self._last_saved_step = -1
        self._warned_missing = False
        self._resumed_from: Optional[str] = None  # the checkpoint the running fit resumed from

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self):
        return {"dirpath": self.dirpath, "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "best_k_models": dict(self.best_k_models),
                "last_model_path": self.last_model_path, "latest": list(self._latest)}

    def load_state_dict(self, state_dict):
        """Continues the saved run's bookkeeping when this run resumed from a checkpoint in the folder that run
        wrote to and writes into it too.

        Otherwise only `best_model_path` is taken over (for reference), and this run starts its
        own top-k: the old run's files are never deleted or overwritten.
        """
        self.best_model_path = state_dict.get("best_model_path", "")
        saved = state_dict.get("dirpath")
        resumed_from = os.path.dirname(os.path.abspath(self._resumed_from)) if self._resumed_from else saved
        if not (_same_folder(self.dirpath, saved) and _same_folder(saved, resumed_from)):
            if self.dirpath is not None and saved:
                warnings.warn(f"ModelCheckpoint: the checkpoint's run wrote to {saved}; this one resumed from "
                              f"{resumed_from} and writes to {self.dirpath}: it starts its own top-k there and leaves "
                              "the old run's files alone (only best_model_path is taken over).", stacklevel=2)
            return
        self.best_model_score = state_dict.get("best_model_score")
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.last_model_path = state_dict.get("last_model_path", "")
        self._latest = list(state_dict.get("latest", []))

    # ---- finding checkpoints -------------------------------------------------------------
    def resolve_dirpath(self, trainer) -> str:
        """Fixes the default folder (under the logger's version folder) unless one was given; returns it."""
        if self.dirpath is None:
            root = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
            self.dirpath = os.path.join(root, "checkpoints")
        return self.dirpath

    def _search_pattern(self, trainer) -> str:
        """Where this callback's checkpoints of earlier runs are (a glob pattern of folders): its folder, or,
        for the default one, the `checkpoints` folders of every version of the logger's experiment (a new
        run writes a new version)."""
        if self._dirpath_given or trainer.logger is None or trainer.logger.log_dir is None:
            return glob.escape(self.resolve_dirpath(trainer))
        experiment = os.path.dirname(trainer.logger.log_dir)
        return os.path.join(glob.escape(experiment), "*", "checkpoints")

    def find_checkpoint(self, which: str, trainer) -> Optional[str]:
        """Returns the "best" or "last" checkpoint path this callback knows or can find, or None.

        "last" is the path this callback wrote last in this process, or else the newest
        checkpoint file in its folder (for the default folder, in any version of the logger's
        experiment), an interrupted run's included.
        """
        if which == "best":
            return self.best_model_path or None
        if self.last_model_path and os.path.exists(self.last_model_path):
            return self.last_model_path
        files = [path for path in glob.glob(os.path.join(self._search_pattern(trainer), "*" + self.CHECKPOINT_EXTENSION))
                 if os.path.isfile(path)]
        return max(files, key=os.path.getmtime) if files else None

    def searched(self, trainer) -> str:
        """Where `find_checkpoint` looks (a glob pattern), for messages."""
        return self._search_pattern(trainer)

    # ---- hooks ---------------------------------------------------------------------------
    def setup(self, trainer, module, stage):
        if stage == "fit":
            self._resumed_from = trainer.ckpt_path
            folder = self.resolve_dirpath(trainer)
            if trainer.is_global_zero:
                remove_stale_temporaries(folder)  # left by runs killed mid-write

    def needs_host_at_step(self, trainer, step: int) -> bool:
        return bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_saved_step \
                and trainer.state.window == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, module):
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step != self._last_saved_step:
            self._save(trainer)

    # ---- saving --------------------------------------------------------------------------
    def new_path(self, name: str, replacing: Optional[str] = None) -> str:
        """`<dirpath>/<name>.ckpt`, or with `-v1`, `-v2`, ... if that exists (unless it is `replacing`, a file
        of this run's that this save drops anyway)."""
        path = os.path.join(self.dirpath, name + self.CHECKPOINT_EXTENSION)
        version = 0
        while os.path.exists(path) and path != replacing:
            version += 1
            path = os.path.join(self.dirpath, f"{name}-v{version}{self.CHECKPOINT_EXTENSION}")
        return path

    def _kept(self) -> set:
        """The files this run keeps and owns: a save may overwrite or delete them (none when save_top_k=-1
        ranks by recency: nothing is ever pruned then)."""
        last = {self.last_model_path} if self.save_last and self.last_model_path else set()
        return set(self.best_k_models) | set(self._latest) | last

    def _save(self, trainer) -> None:
        """Decides the files of this save, records them, writes them, then deletes the files they push out.

        The bookkeeping is updated before writing, so each file's saved state lists itself:
        a run resumed from it prunes it like the uninterrupted run would.
        """
        self._last_saved_step = trainer.global_step
        values = dict(trainer.callback_metrics)
        values.update(epoch=trainer.current_epoch, step=trainer.global_step)
        before = (dict(self.best_k_models), list(self._latest), self.best_model_path, self.best_model_score,
                  self.last_model_path)
        owned = self._kept()
        writes = []
        if self.save_top_k != 0:
            path = self._rank(trainer, values)
            if path is not None:
                writes.append(path)
        if self.save_last:
            last = self.new_path("last", replacing=self.last_model_path or None)
            self.last_model_path = last
            writes.append(last)
        try:
            for path in writes:
                trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        except BaseException:
            (self.best_k_models, self._latest, self.best_model_path, self.best_model_score,
             self.last_model_path) = before
            raise
        for path in owned - self._kept():  # pushed out by this save (by rank 0, which wrote it)
            if trainer.is_global_zero and os.path.exists(path):
                os.remove(path)

    def _rank(self, trainer, values) -> Optional[str]:
        """Records the top-k file of this save, dropping the one it pushes out; returns its path or None."""
        try:
            name = format_checkpoint_name(self.filename, values)
        except KeyError as missing:
            raise KeyError(f"ModelCheckpoint(filename={self.filename!r}) uses {missing}, which is not logged. "
                           + trainer.describe_missing_metric(str(missing).strip("'"))) from None
        if self.monitor is None:
            dropped = self._latest[0] if 0 < self.save_top_k <= len(self._latest) else None
            path = self.new_path(name, replacing=dropped)
            if self.save_top_k > 0:
                self._latest = [p for p in self._latest if p != dropped] + [path]
            self.best_model_path = path
            if not self.save_last:
                self.last_model_path = path
            return path
        if self.monitor not in values:
            if not trainer.validation_has_run:
                if not self._warned_missing:
                    self._warned_missing = True
                    warnings.warn(f"ModelCheckpoint(monitor={self.monitor!r}) skips its top-k saves until the value "
                                  f"is logged. {trainer.describe_missing_metric(self.monitor)}", stacklevel=3)
                return None
            raise KeyError(f"ModelCheckpoint(monitor={self.monitor!r}) found no such logged value. "
                           + trainer.describe_missing_metric(self.monitor))
        score = float(values[self.monitor])
        if math.isnan(score):
            score = math.inf if self.mode == "min" else -math.inf
        dropped = None
        if self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k:
            pick_worst = max if self.mode == "min" else min
            dropped = pick_worst(self.best_k_models, key=self.best_k_models.get)
            if not self._better(score, self.best_k_models[dropped]):
                return None
        path = self.new_path(name, replacing=dropped)
        self.best_k_models.pop(dropped, None)
        self.best_k_models[path] = score
        pick = min if self.mode == "min" else max
        self.best_model_path = pick(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        return path

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.mode == "min" else score > than
