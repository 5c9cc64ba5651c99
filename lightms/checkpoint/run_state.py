"""What a full checkpoint holds about a run, and how a run is restored from it.

Saved: weights, optimizer state (moments, step counter, learning rate), the
accumulation window if the save happens inside one, the loop position (epoch,
global step, batches done in the epoch), the training epoch's logged sums when
saved mid-epoch, every callback's state, the hyperparameters and the lightms
version. Restoring puts all of it back so the run continues as if never stopped.
"""

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

from lightms._mindspore import mindspore as ms  # noqa: F401

from lightms.checkpoint.io import (OPTIMIZER_PREFIX, assign_checked, check_parameters, optimizer_state,
                                   read_checkpoint, split_saved)
from lightms.module.logging import DeviceLogBuffers, LogOptions

ACCUMULATOR_GROUP = "accumulator"
LOSS_SCALE_GROUP = "loss_scale"
SCHEDULER_GROUP = "scheduler"


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return repr(value)


def collect_run_state(trainer, weights_only: bool) -> Tuple[List, Dict]:
    """Returns the (name, value) pairs and the meta dict of a checkpoint of `trainer`'s run."""
    from lightms import __version__

    model = trainer.model
    parameters = [(p.name, p) for p in model.get_parameters()]
    meta = {"lightms_version": __version__, "weights_only": weights_only,
            "hparams": _json_safe(dict(model.hparams))}
    if weights_only:
        return parameters, meta
    names = {name for name, _ in parameters}
    for optimizer in trainer.optimizers:
        parameters += [(OPTIMIZER_PREFIX + p.name, p) for p in optimizer_state(optimizer, names)]
    for index, config in enumerate(trainer._optimizer_config.schedulers):
        parameters += [(f"lightms.{SCHEDULER_GROUP}{index}.{name}", p) for name, p in config.state_parameters().items()]
    scaler = trainer._loss_scaler
    if scaler is not None:
        parameters += [(f"lightms.{LOSS_SCALE_GROUP}.scale_value", scaler.scale_value),
                       (f"lightms.{LOSS_SCALE_GROUP}.counter", scaler.counter)]
    state = trainer.state
    epoch_done = state.epoch_done
    mid_epoch = not epoch_done and state.batches_done > 0
    meta["loop"] = {
        "epoch": state.current_epoch + 1 if epoch_done else state.current_epoch,
        "global_step": state.global_step,
        "batches_done": state.batches_done if mid_epoch else 0,
    }
    step = trainer._train_step
    if state.window and step is not None and step.accumulators is not None:
        parameters += [(f"lightms.{ACCUMULATOR_GROUP}.{p.name}", p) for p in step.accumulators]
        meta["window"] = state.window
    logs = trainer._metrics.device.get("train")
    if logs is not None and mid_epoch:
        meta["train_logs"] = {"options": [dataclasses.asdict(o) for o in logs.options], "epoch": logs.epoch_state()}
    meta["callbacks"] = {cb.state_key: _json_safe(cb.state_dict()) for cb in trainer.callbacks}
    return parameters, meta


def restore_run_state(trainer, path: str) -> Dict:
    """Restores `trainer`'s attached model, optimizer, loop and callbacks from `path`.

    Returns:
        The checkpoint's meta dict (after the module's `on_load_checkpoint` saw it).

    Raises:
        ValueError: If the checkpoint does not fit the model or optimizer, holds weights only, holds NaN or
            infinite weights or optimizer state, or was written inside an accumulation window that the
            Trainer's `accumulate` cannot finish. Nothing is restored then.
    """
    saved, meta = read_checkpoint(path)
    if not meta or meta.get("weights_only", True) or "loop" not in meta:
        raise ValueError(f"Checkpoint {path} holds weights only (or was not written by lightms) and cannot "
                         "resume training; load it with LightningCell.load_from_checkpoint instead.")
    window = meta.get("window", 0)
    if window >= trainer.accumulate:  # its next micro-batch would never close the window
        raise ValueError(
            f"Checkpoint {path} was written inside an accumulation window holding {window} micro-batch(es), "
            f"which Trainer(accumulate={trainer.accumulate}) cannot finish. Resume with an accumulate greater "
            f"than {window} (the value the run had), or from a checkpoint written at the end of a window.")
    groups = split_saved(saved)
    model = trainer.model
    names = {p.name for p in model.get_parameters()}
    # Everything is checked before anything is copied: a refused checkpoint leaves the run as it was.
    pairs = check_parameters({p.name: p for p in model.get_parameters()}, groups["model"], "model", path, "model")
    state_params = {p.name: p for opt in trainer.optimizers for p in optimizer_state(opt, names)}
    pairs += check_parameters(state_params, groups["optimizer"], "optimizer", path, "all")
    for index, config in enumerate(trainer._optimizer_config.schedulers):
        pairs += check_parameters(config.state_parameters(), groups.get(f"{SCHEDULER_GROUP}{index}", {}),
                                  f"learning-rate scheduler {index} ({type(config.scheduler).__name__})", path)
    scaler = trainer._loss_scaler
    if scaler is not None and LOSS_SCALE_GROUP in groups:  # a float32 checkpoint starts at the initial scale
        pairs += check_parameters({"scale_value": scaler.scale_value, "counter": scaler.counter},
                                  groups[LOSS_SCALE_GROUP], "loss scaler", path, "all")
    assign_checked(pairs)
    loop = meta["loop"]
    trainer.state.current_epoch = loop["epoch"]
    trainer.state.global_step = loop["global_step"]
    trainer.state.batches_done = loop["batches_done"]
    trainer.state.window = window
    trainer._pending_accumulators = groups.get(ACCUMULATOR_GROUP) or None
    if "train_logs" in meta:
        logs = DeviceLogBuffers([LogOptions(**o) for o in meta["train_logs"]["options"]])
        logs.load_epoch_state(meta["train_logs"]["epoch"])
        trainer._metrics.restore_train_buffers(logs)
    by_key = meta.get("callbacks", {})
    for cb in trainer.callbacks:
        if cb.state_key in by_key:
            cb.load_state_dict(by_key[cb.state_key])
    model.on_load_checkpoint(meta)
    return meta
