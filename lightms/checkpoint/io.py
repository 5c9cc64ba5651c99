"""Checkpoint files: MindSpore's own `.ckpt` format, written atomically with a CRC, read with clear errors.

A lightms checkpoint is a plain MindSpore checkpoint: the module's parameters
under their own names (so `mindspore.load_checkpoint` + `load_param_into_net`
load the weights without lightms), the optimizer's state under
`lightms.optimizer.<name>`, any other device state under `lightms.<group>.<name>`,
and everything else (loop counters, callback states, hyperparameters, version)
as a JSON string under `lightms_meta`. MindSpore's CRC32 of the contents
(`crc_check=True`) is appended, and checked on every read.
"""

import binascii
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, ops

META_KEY = "lightms_meta"
OPTIMIZER_PREFIX = "lightms.optimizer."
# MindSpore ends a checkpoint written with crc_check=True with b"crc_num" and the CRC32 in 10 big-endian bytes.
_CRC_MARK, _CRC_BYTES = b"crc_num", 10
# What `write_checkpoint` leaves behind when its process dies mid-write: its own temporary name, and the
# one MindSpore writes first (the same with ".ckpt" replaced by ".tmp"). They name the writer's host and pid:
# a pid says whether its writer still runs only on the writer's own host (a folder may be shared by machines).
_TEMPORARY = re.compile(r"^\..+\.([A-Za-z0-9-]+)\.(\d+)\.tmp\.(ckpt|tmp)$")


def _host() -> str:
    """This machine's name, as temporary names hold it (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


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


def _temporaries(path: str) -> Tuple[str, str]:
    """(lightms's temporary name for a write of `path`, the name MindSpore writes first)."""
    folder, base = os.path.split(os.path.abspath(path))
    # MindSpore appends ".ckpt" to names without it, so lightms's temporary name ends in ".ckpt" too.
    ours = os.path.join(folder, f".{base}.{_host()}.{os.getpid()}.tmp.ckpt")
    return ours, ours[:-len(".ckpt")] + ".tmp"


def write_checkpoint(path: str, parameters: Iterable[Tuple[str, Parameter]], meta: Dict) -> None:
    """Writes a checkpoint atomically: to a temporary file first, then renamed over `path`.

    A crash or a full disk during the write leaves any previous file at `path`
    untouched, and a failed write removes its temporary files.

    Args:
        path: Destination path (any extension); its folder is created.
        parameters: (name, Parameter or Tensor) pairs to store.
        meta: JSON-serialisable run state.

    Raises:
        OSError: If the file cannot be written (no space, no permission), naming `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary, mindspore_temporary = _temporaries(path)
    entries = [{"name": name, "data": value} for name, value in parameters]
    try:
        # "crc" tells a reader that a missing CRC trailer means damage, not an older writer.
        ms.save_checkpoint(entries, temporary, append_dict={META_KEY: json.dumps({**meta, "crc": True})},
                           crc_check=True)
        _sync(temporary)  # on disk before it replaces the earlier file: a power loss leaves one of them whole
        os.replace(temporary, path)
        _sync(folder)
    except OSError as error:
        message = (f"Could not write the checkpoint {path} ({error.strerror or error}); any earlier file at "
                   "that path is unchanged.")
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
    finally:
        for leftover in (temporary, mindspore_temporary):
            if os.path.exists(leftover):
                os.remove(leftover)


def _sync(path: str) -> None:
    """Flushes a file's (or a folder's) contents to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems cannot sync a folder
        pass
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: str) -> List[str]:
    """Deletes the temporary files of checkpoint writes whose process died (SIGKILL, power loss) in `folder`.

    Only files named as `write_checkpoint` names them, written on this machine by a process that
    no longer runs (or by this process, which writes one checkpoint at a time and is not writing
    now). Another machine's are kept: this one cannot tell whether their writer still runs.

    Returns:
        The paths removed.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        if match is None:
            continue
        host, pid = match.group(1), int(match.group(2))
        if host != _host() or (pid != os.getpid() and _process_alive(pid)):
            continue  # another machine's, or another run is writing it now
        path = os.path.join(folder, name)
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _check_crc(path: str) -> bool:
    """Checks MindSpore's CRC32 trailer of a `.ckpt` file; returns whether the file has one.

    Raises:
        ValueError: If the file has a trailer and its contents do not match it.
    """
    tail = len(_CRC_MARK) + _CRC_BYTES
    size = os.path.getsize(path)
    if size < tail:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - tail)
        trailer = handle.read(tail)
        if trailer[:len(_CRC_MARK)] != _CRC_MARK:
            return False
        handle.seek(0)
        crc, left = 0, size - tail
        while left:  # in blocks: a checkpoint may be larger than the memory to spare
            block = handle.read(min(left, 1 << 24))
            crc, left = binascii.crc32(block, crc), left - len(block)
    if crc != int.from_bytes(trailer[len(_CRC_MARK):], "big"):
        raise ValueError(f"Checkpoint {path} is corrupt: its contents do not match the CRC32 written with it "
                         "(the file changed after it was written). Use another checkpoint.")
    return True


def _load(path: str) -> Dict:
    """`mindspore.load_checkpoint(path)`, also for a file whose name does not end in `.ckpt`.

    MindSpore refuses other extensions; a renamed checkpoint is read through a link named `.ckpt`.
    """
    if path.endswith(".ckpt"):
        return ms.load_checkpoint(path)
    folder = tempfile.mkdtemp(prefix="lightms-ckpt-")
    try:
        link = os.path.join(folder, "checkpoint.ckpt")
        try:
            os.symlink(os.path.abspath(path), link)
        except OSError:  # no symlinks here (some filesystems): a copy reads the same
            shutil.copyfile(path, link)
        return ms.load_checkpoint(link)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_checkpoint(path: str) -> Tuple[Dict[str, Parameter], Dict]:
    """Reads a checkpoint written by `write_checkpoint` (or any MindSpore `.ckpt` file, of any extension).

    Returns:
        (name -> Parameter, the meta dict; empty for a plain MindSpore checkpoint).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is truncated or corrupt (its CRC32 does not match, or it cannot
            be parsed), or a lightms checkpoint lost its CRC.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    has_crc = _check_crc(path)
    try:
        loaded = _load(path)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"Checkpoint {path} is truncated or corrupt and cannot be read ({error}).") from None
    meta = loaded.pop(META_KEY, None)
    try:
        meta = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        raise ValueError(f"Checkpoint {path} has an unreadable '{META_KEY}' entry.") from None
    if meta.get("crc") and not has_crc:
        raise ValueError(f"Checkpoint {path} is corrupt: it was written with a CRC32, which is missing or damaged.")
    return loaded, meta


# What `assign_parameters` refuses in saved values: "all" any NaN or infinity; "model" any in a trainable
# parameter and NaN in the others (a buffer may hold -inf on purpose, an attention mask say).
FINITE_RULES = ("all", "model")


def _not_finite(value: np.ndarray, target: Parameter, rule: Optional[str]) -> bool:
    if rule is None or not np.issubdtype(value.dtype, np.floating):
        return False
    if rule == "all" or target.requires_grad:
        return not np.isfinite(value).all()
    return bool(np.isnan(value).any())


def check_parameters(targets: Dict[str, Parameter], saved: Dict[str, Parameter], what: str, path: str,
                     finite: Optional[str] = None) -> List[Tuple[Parameter, np.ndarray]]:
    """Checks that saved values fit `targets` exactly; returns the (target, value) pairs to assign.

    Args:
        targets: name -> Parameter to fill.
        saved: name -> saved value; must have exactly the names of `targets`.
        what: "model", "optimizer", ..., for the message.
        path: The checkpoint path, for the message.
        finite: None, or a rule of `FINITE_RULES` for the values.

    Raises:
        ValueError: Listing missing names, unexpected names, shape mismatches, and values
            that are NaN or infinite.
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
    pairs = [(param, saved[name].asnumpy()) for name, param in targets.items()]
    broken = sorted(param.name for param, value in pairs if _not_finite(value, param, finite))
    if broken:
        raise ValueError(f"Checkpoint {path} holds NaN or infinite values in {what} parameters {broken}: the run "
                         "that wrote it had diverged. Resume from an earlier checkpoint.")
    return pairs


def assign_checked(pairs: List[Tuple[Parameter, np.ndarray]]) -> None:
    """Copies what `check_parameters` returned into the parameters.

    Values are written with `ops.assign`, not `set_data`: compiled graphs keep
    pointing at the same parameters.
    """
    for param, value in pairs:
        ops.assign(param, Tensor(value, param.dtype))


def assign_parameters(targets: Dict[str, Parameter], saved: Dict[str, Parameter], what: str, path: str,
                      finite: Optional[str] = None) -> None:
    """Checks (`check_parameters`) and copies saved values into `targets`.

    Raises:
        ValueError: As `check_parameters`, before anything is copied.
    """
    assign_checked(check_parameters(targets, saved, what, path, finite))


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
