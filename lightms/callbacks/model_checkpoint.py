"""`ModelCheckpoint`: full-state checkpoints on a schedule, keeping the top k by a metric."""

import math
import os
import re
from typing import Dict, Optional

from lightms.callbacks.callback import Callback

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


class ModelCheckpoint(Callback):
    """Saves full checkpoints (weights, optimizer, loop, callbacks) that resume a run exactly.

    Steps are optimizer steps. Without `every_n_train_steps` or `every_n_epochs`, it
    saves at the end of every epoch (after its validation). With `monitor`, it keeps
    the `save_top_k` best files by that metric; without, the latest `save_top_k`.
    Files are written atomically; an existing file that this callback did not write
    is never overwritten (a `-vN` suffix is added instead).

    Args:
        dirpath: Folder; default `<logger version folder>/checkpoints` (or
            `<default_root_dir>/checkpoints` without a logger).
        filename: Template such as "{epoch}-{val_loss:.2f}"; default "{epoch}-{step}".
        monitor: Metric name in `trainer.callback_metrics` to rank by; None ranks by recency.
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
        self._latest = []  # recency order when not monitoring
        self._written = set()
        self._last_saved_step = -1

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self):
        return {"dirpath": self.dirpath, "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "best_k_models": dict(self.best_k_models),
                "last_model_path": self.last_model_path, "latest": list(self._latest)}

    def load_state_dict(self, state_dict):
        self.best_model_path = state_dict.get("best_model_path", "")
        self.best_model_score = state_dict.get("best_model_score")
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.last_model_path = state_dict.get("last_model_path", "")
        self._latest = list(state_dict.get("latest", []))
        if self.dirpath is None:
            self.dirpath = state_dict.get("dirpath")
        self._written.update(self.best_k_models, self._latest)
        if self.last_model_path:
            self._written.add(self.last_model_path)

    def find_checkpoint(self, which: str) -> Optional[str]:
        """Returns the "best" or "last" checkpoint path this callback knows or can find, or None."""
        if which == "best":
            return self.best_model_path or None
        if self.last_model_path and os.path.exists(self.last_model_path):
            return self.last_model_path
        if self.dirpath and os.path.isdir(self.dirpath):
            files = [os.path.join(self.dirpath, f) for f in os.listdir(self.dirpath)
                     if f.endswith(self.CHECKPOINT_EXTENSION)]
            if files:
                return max(files, key=os.path.getmtime)
        return None

    # ---- hooks ---------------------------------------------------------------------------
    def setup(self, trainer, module, stage):
        if self.dirpath is None:
            root = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
            self.dirpath = os.path.join(root, "checkpoints")

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
    def _values(self, trainer) -> Dict[str, float]:
        values = dict(trainer.callback_metrics)
        values.update(epoch=trainer.current_epoch, step=trainer.global_step)
        return values

    def _path_for(self, values) -> str:
        try:
            name = format_checkpoint_name(self.filename, values)
        except KeyError as missing:
            raise KeyError(f"ModelCheckpoint(filename={self.filename!r}) uses {missing}, which is not logged; "
                           f"available: {sorted(values)}") from None
        path = os.path.join(self.dirpath, name + self.CHECKPOINT_EXTENSION)
        version = 0
        while os.path.exists(path) and path not in self._written:  # never overwrite someone else's file
            version += 1
            path = os.path.join(self.dirpath, f"{name}-v{version}{self.CHECKPOINT_EXTENSION}")
        return path

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.mode == "min" else score > than

    def _save(self, trainer) -> None:
        self._last_saved_step = trainer.global_step
        values = self._values(trainer)
        if self.save_top_k != 0:
            if self.monitor is None:
                self._save_latest(trainer, values)
            else:
                self._save_top_k(trainer, values)
        if self.save_last:
            last = os.path.join(self.dirpath, "last" + self.CHECKPOINT_EXTENSION)
            self._write(trainer, last)
            self.last_model_path = last

    def _write(self, trainer, path: str) -> None:
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        self._written.add(path)

    def _remove(self, path: str) -> None:
        if path in self._written and os.path.exists(path) and path != self.last_model_path:
            os.remove(path)

    def _save_latest(self, trainer, values) -> None:
        path = self._path_for(values)
        self._write(trainer, path)
        if not self.save_last:
            self.last_model_path = path
        self._latest.append(path)
        if self.save_top_k > 0:
            while len(self._latest) > self.save_top_k:
                self._remove(self._latest.pop(0))
        self.best_model_path = path

    def _save_top_k(self, trainer, values) -> None:
        if self.monitor not in values:
            raise KeyError(f"ModelCheckpoint(monitor={self.monitor!r}) found no such logged value; "
                           f"available: {sorted(trainer.callback_metrics)}")
        score = float(values[self.monitor])
        if math.isnan(score):
            score = math.inf if self.mode == "min" else -math.inf
        full = self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k
        worst = None
        if full:
            worst = max(self.best_k_models, key=self.best_k_models.get) if self.mode == "min" else \
                min(self.best_k_models, key=self.best_k_models.get)
            if not self._better(score, self.best_k_models[worst]):
                return
        path = self._path_for(values)
        self._write(trainer, path)
        self.best_k_models[path] = score
        if worst is not None:
            del self.best_k_models[worst]
            self._remove(worst)
        pick = min if self.mode == "min" else max
        self.best_model_path = pick(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]

