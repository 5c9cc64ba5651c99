"""Checkpoint files: MindSpore's own `.ckpt` format, written atomically, read with clear errors.

A lightms checkpoint is a plain MindSpore checkpoint: the module's parameters
under their own names (so `mindspore.load_checkpoint` + `load_param_into_net`
load the weights without lightms), the optimizer's state under
`lightms.optimizer.<name>`, any other device state under `lightms.<group>.<name>`,
and everything else (loop counters, callback states, hyperparameters, version)
as a JSON string under `lightms_meta`.
"""

import json
import os
from typing import Dict, Iterable, List, Tuple

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, ops

META_KEY = "lightms_meta"
OPTIMIZER_PREFIX = "lightms.optimizer."


def optimizer_state(optimizer, module_parameter_names) -> List[Parameter]:
    """Returns the optimizer's own state parameters (moments, step counter, learning rate), not the weights.

    `mindspore.experimental.optim` optimizers keep their learning rates in
    `param_groups`, outside `get_parameters()`; those are included too.
    """
    state = [p for p in optimizer.get_parameters() if p.name not in module_parameter_names]
    known = {p.name for p in state}
    for group in getattr(optimizer, "param_groups", []):
        for value in group.values():
            if isinstance(value, Parameter) and value.name not in known and value.name not in module_parameter_names:
                state.append(value)
                known.add(value.name)
    return state


def write_checkpoint(path: str, parameters: Iterable[Tuple[str, Parameter]], meta: Dict) -> None:
    """Writes a checkpoint atomically: to a temporary file first, then renamed over `path`.

    A crash during the write leaves any previous file at `path` untouched.

    Args:
        path: Destination `.ckpt` path; its folder is created.
        parameters: (name, Parameter or Tensor) pairs to store.
        meta: JSON-serialisable run state.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # MindSpore appends ".ckpt" to names without it, so the temporary name ends in ".ckpt" too.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp.ckpt")
    entries = [{"name": name, "data": value} for name, value in parameters]
    try:
        ms.save_checkpoint(entries, temporary, append_dict={META_KEY: json.dumps(meta)})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_checkpoint(path: str) -> Tuple[Dict[str, Parameter], Dict]:
    """Reads a checkpoint written by `write_checkpoint` (or any MindSpore checkpoint).

    Returns:
        (name -> Parameter, the meta dict; empty for a plain MindSpore checkpoint).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is truncated or corrupt.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        loaded = ms.load_checkpoint(path)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"Checkpoint {path} is truncated or corrupt and cannot be read ({error}).") from None
    meta = loaded.pop(META_KEY, None)
    try:
        meta = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        raise ValueError(f"Checkpoint {path} has an unreadable '{META_KEY}' entry.") from None
    return loaded, meta


def assign_parameters(targets: Dict[str, Parameter], saved: Dict[str, Parameter], what: str, path: str) -> None:
    """Copies saved values into `targets`, refusing any mismatch.

    Values are written with `ops.assign`, not `set_data`: compiled graphs keep
    pointing at the same parameters.

    Args:
        targets: name -> Parameter to fill.
        saved: name -> saved value; must have exactly the names of `targets`.
        what: "model" or "optimizer", for the message.
        path: The checkpoint path, for the message.

    Raises:
        ValueError: Listing missing names, unexpected names and shape mismatches.
    """
    missing = sorted(set(targets) - set(saved))
    unexpected = sorted(set(saved) - set(targets))
    wrong_shape = sorted(f"{name}: checkpoint {tuple(saved[name].shape)} vs {what} {tuple(targets[name].shape)}"
                         for name in set(targets) & set(saved)
                         if tuple(saved[name].shape) != tuple(targets[name].shape))
    if missing or unexpected or wrong_shape:
        lines = [f"Checkpoint {path} does not fit this {what}:"]
        if missing:
            lines.append(f"  missing from the checkpoint: {missing}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint: {unexpected}")
        if wrong_shape:
            lines.append(f"  wrong shapes: {wrong_shape}")
        raise ValueError("\n".join(lines))
    for name, param in targets.items():
        value = saved[name]
        ops.assign(param, Tensor(value.asnumpy(), param.dtype))


def split_saved(saved: Dict[str, Parameter]) -> Dict[str, Dict[str, Parameter]]:
    """Groups saved entries: "model" (no prefix), "optimizer", and each other `lightms.<group>.`."""
    groups: Dict[str, Dict[str, Parameter]] = {"model": {}, "optimizer": {}}
    for name, value in saved.items():
        if name.startswith(OPTIMIZER_PREFIX):
            groups["optimizer"][name[len(OPTIMIZER_PREFIX):]] = value
        elif name.startswith("lightms."):
            group, _, rest = name[len("lightms."):].partition(".")
            groups.setdefault(group, {})[rest] = value
        else:
            groups["model"][name] = value
    return groups
