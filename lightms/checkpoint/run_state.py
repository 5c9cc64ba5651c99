"""What a full checkpoint holds about a run, composed from each piece's own state, and how a run is restored.

Saved: the module's weights; the optimizer's state (moments, step counter, learning
rate) and the host-side schedulers'; the engine's device state (the accumulation
window's gradients when saved inside one, the loss scale, the logged epoch sums); the
loop position (`LoopState.state_dict`); every callback's `state_dict`; the
hyperparameters and the lightms version. Restoring puts all of it back so the run
continues as if never stopped.
"""

from typing import Dict, List, Tuple

import numpy as np

from lightms.checkpoint.io import (OPTIMIZER_PREFIX, assign_checked, check_parameters, optimizer_state,
                                   read_checkpoint, split_saved)

SCHEDULER_GROUP = "scheduler"
ENGINE_GROUPS = ("accumulator", "loss_scale", "privacy")  # `TrainEngine.state_dict` names: "<group>.<name>"


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


def collect_run_state(model, weights_only: bool, optimizers=(), schedulers=(), loop=None, engine_state=None,
                      callbacks=()) -> Tuple[List, Dict]:
    """The (name, value) pairs and the meta dict of a checkpoint.

    Args:
        model: The LightningCell.
        weights_only: Only the weights and hyperparameters.
        optimizers: The run's optimizers (none outside fit: the checkpoint cannot resume training then).
        schedulers: Their host-side `SchedulerConfig`s.
        loop: The `LoopState`, or None.
        engine_state: `TrainEngine.state_dict(...)`: (name -> Tensor, JSON state), or None before one exists.
        callbacks: The Trainer's callbacks.
    """
    from lightms import __version__

    parameters = [(p.name, p) for p in model.get_parameters()]
    meta = {"lightms_version": __version__, "weights_only": weights_only, "hparams": _json_safe(dict(model.hparams))}
    if weights_only:
        return parameters, meta
    names = {name for name, _ in parameters}
    for optimizer in optimizers:
        parameters += [(OPTIMIZER_PREFIX + p.name, p) for p in optimizer_state(optimizer, names)]
    meta["resumable"] = bool(optimizers)
    for index, config in enumerate(schedulers):
        parameters += [(f"lightms.{SCHEDULER_GROUP}{index}.{name}", p) for name, p in config.state_parameters().items()]
    if loop is not None:
        meta["loop"] = loop.state_dict()
        meta["window"] = loop.window
    if engine_state is not None:
        tensors, state = engine_state
        parameters += [(f"lightms.{name}", value) for name, value in tensors.items()]
        if loop is None or not loop.state_dict()["batches_done"]:  # logged epoch sums: only an unfinished epoch's
            state = {key: value for key, value in state.items() if key != "logs"}
        if state:
            meta["engine"] = state
    meta["callbacks"] = {cb.state_key: _json_safe(cb.state_dict()) for cb in callbacks}
    return parameters, meta


def restore_run_state(trainer, path: str) -> Tuple[Dict, Dict]:
    """Restores `trainer`'s model, optimizer, schedulers, loop and callbacks from `path`.

    Returns:
        The engine's part, (name -> saved value, JSON state), for `TrainEngine.load_state_dict`
        once the engine is built (either may be empty).

    Raises:
        ValueError: If the checkpoint does not fit the model or optimizer, holds weights only or no
            optimizer state, holds NaN or infinite weights or optimizer state, was written inside
            an accumulation window that the Trainer's `accumulate` cannot finish, or has a loop
            position this run cannot take (`LoopState.load_state_dict`). Nothing is restored then.
    """
    saved, meta = read_checkpoint(path)
    if not meta or meta.get("weights_only", True) or "loop" not in meta:
        raise ValueError(f"Checkpoint {path} holds weights only (or was not written by lightms) and cannot "
                         "resume training; load it with LightningCell.load_from_checkpoint instead.")
    if not meta.get("resumable", True):
        raise ValueError(f"Checkpoint {path} was written outside fit (after validate, test or predict), so it holds "
                         "no optimizer state and cannot resume training; load it with "
                         "LightningCell.load_from_checkpoint instead.")
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
    for index, config in enumerate(trainer.lr_scheduler_configs):
        pairs += check_parameters(config.state_parameters(), groups.get(f"{SCHEDULER_GROUP}{index}", {}),
                                  f"learning-rate scheduler {index} ({type(config.scheduler).__name__})", path)
    if window:  # the window's gradients go into the engine once it is built: checked against the optimizer now
        check_parameters({f"lightms_accum.{p.name}": p for opt in trainer.optimizers for p in opt.parameters},
                         groups.get("accumulator", {}), "accumulation window", path)
    type(trainer.state)().load_state_dict(meta["loop"], window, trainer.world_size)  # its refusals, on a scratch copy
    assign_checked(pairs)
    trainer.state.load_state_dict(meta["loop"], window, trainer.world_size)
    by_key = meta.get("callbacks", {})
    for cb in trainer.callbacks:
        if cb.state_key in by_key:
            cb.load_state_dict(by_key[cb.state_key])
    model.on_load_checkpoint(meta)
    engine_tensors = {f"{group}.{name}": value for group in ENGINE_GROUPS for name, value in groups.get(group, {}).items()}
    if not window:  # accumulators saved outside a window hold nothing to continue
        engine_tensors = {name: value for name, value in engine_tensors.items() if not name.startswith("accumulator.")}
    return engine_tensors, meta.get("engine", {})
