"""Where this process stands in a data-parallel run, and MindSpore's distributed setup.

lightms runs data-parallel on MindSpore's own runtime: `msrun` starts the workers (and
runs the script once more as its scheduler), `mindspore.communication.init()` joins
them, and `ops.AllReduce` averages the gradients inside the compiled step. msrun tells
each process its role through environment variables: `MS_ROLE` (`MS_WORKER` or
`MS_SCHED`), `MS_WORKER_NUM`, `MS_SCHED_HOST`, `MS_SCHED_PORT`. The ranks are read from
`mindspore.communication` after `init()`.
"""

import atexit
import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiets MindSpore's logs before it loads)


@dataclass(frozen=True)
class ClusterEnvironment:
    """This process's place in the run.

    Attributes:
        world_size: Workers in the run (1: a single process).
        global_rank: This worker's rank among all workers.
        local_rank: Its rank on its machine.
    """

    world_size: int = 1
    global_rank: int = 0
    local_rank: int = 0

    @property
    def is_global_zero(self) -> bool:
        """Whether this worker writes logs and checkpoints (rank 0)."""
        return self.global_rank == 0


def msrun_workers(environ: Mapping[str, str] = os.environ) -> int:
    """How many workers msrun started this run with (0: not started by msrun)."""
    if environ.get("MS_ROLE") not in ("MS_WORKER", "MS_SCHED") or "MS_SCHED_PORT" not in environ:
        return 0
    try:
        return int(environ.get("MS_WORKER_NUM", "0"))
    except ValueError:
        return 0


def is_msrun_scheduler(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is msrun's scheduler (the script's third run, which only coordinates)."""
    return environ.get("MS_ROLE") == "MS_SCHED" and msrun_workers(environ) > 0


def join_cluster(collective_timeout: Optional[float] = None) -> ClusterEnvironment:
    """Initialises MindSpore's communication (once per process) and returns this worker's place.

    In msrun's scheduler process, `init()` serves the workers and ends the process when they
    are done: nothing after it runs there. Communication is released when the process exits.

    Args:
        collective_timeout: Seconds a collective waits for the other workers before it fails. MindSpore
            reads it as the worker joins, from `MS_CPU_COMM_OP_TIMEOUT` (on CPU; set here unless the user
            set it) or else `MS_NODE_TIMEOUT` (its default, tens of seconds, fails a run whose rank 0
            takes longer to write a checkpoint). None: MindSpore's settings.
    """
    from mindspore import communication

    if not _joined():
        if collective_timeout is not None:
            os.environ["MS_NODE_TIMEOUT"] = str(math.ceil(collective_timeout))
            os.environ.setdefault("MS_CPU_COMM_OP_TIMEOUT", str(math.ceil(collective_timeout)))
        communication.init()
        atexit.register(leave_cluster)  # after the script's last fit: a worker may fit several times
    elif collective_timeout is not None and os.environ.get("MS_NODE_TIMEOUT") != str(math.ceil(collective_timeout)):
        import warnings

        warnings.warn(f"This worker joined the others with a {os.environ.get('MS_NODE_TIMEOUT')} s wait for "
                      f"collectives, which MindSpore keeps for the process: a timeout of {collective_timeout:.0f} s "
                      "(DDPStrategy) applies to lightms's watchdog only.", stacklevel=4)
    return ClusterEnvironment(communication.get_group_size(), communication.get_rank(),
                              communication.get_local_rank())


def _joined() -> bool:
    try:
        from mindspore.communication import GlobalComm

        return bool(GlobalComm.INITED)
    except (ImportError, AttributeError):  # pragma: no cover - other MindSpore versions
        return False


def leave_cluster() -> None:
    """Releases MindSpore's communication (at the end of a distributed run)."""
    from mindspore import communication

    if _joined():
        communication.release()


def resolve_environment(strategy: str, devices, num_nodes: int,
                        collective_timeout: Optional[float] = None) -> Optional[ClusterEnvironment]:
    """The run's environment for the Trainer's `strategy`, `devices` and `num_nodes` (and `join_cluster`'s
    `collective_timeout`).

    Returns:
        None for a single process; otherwise the environment after joining the cluster.

    Raises:
        RuntimeError: For `strategy="ddp"` outside msrun, or a worker count that differs from
            `devices * num_nodes`, saying how to launch.
    """
    workers = msrun_workers()
    expected = devices * num_nodes if isinstance(devices, int) else None  # None: "auto", what msrun started
    if strategy == "auto" and workers == 0 and expected in (None, 1):
        return None
    if workers == 0:
        asked = f"strategy={strategy!r}" if strategy != "auto" else f"devices={devices}, num_nodes={num_nodes}"
        raise RuntimeError(f"Trainer({asked}) runs data-parallel on MindSpore's msrun, which starts the workers: "
                           "launch the script with `python -m lightms.launch --devices N script.py` (or msrun itself).")
    if expected is not None and expected != workers:
        raise RuntimeError(f"Trainer(devices={devices}, num_nodes={num_nodes}) expects {expected} workers, but msrun "
                           f"started {workers}; launch with as many workers as devices * num_nodes.")
    return join_cluster(collective_timeout)


def user_node_timeout(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """`MS_NODE_TIMEOUT` in seconds if the user set it (not `lightms.launch`, for msrun's scheduler), else None."""
    from lightms.launch import LAUNCHER_NODE_TIMEOUT  # (the launcher imports nothing of MindSpore's)

    value = environ.get("MS_NODE_TIMEOUT", "")
    if LAUNCHER_NODE_TIMEOUT in environ or not value.isdigit() or int(value) == 0:
        return None
    return float(value)


def serve_if_scheduler() -> None:
    """In msrun's scheduler process: serves the workers now (the process ends when they are done), before
    the script builds models or reads data it has no use for."""
    if is_msrun_scheduler():
        join_cluster()


def broadcast_parameters(parameters) -> None:
    """Makes every worker's `parameters` rank 0's (an AllGather per Parameter: CPU has no other root-based
    collective that lightms can rely on), so that workers seeded differently start from the same weights."""
    from mindspore import Tensor, ops

    gather = ops.AllGather()
    for param in parameters:
        value = param.value() if hasattr(param, "value") else param
        first = gather(ops.expand_dims(Tensor(value.asnumpy()), 0))[0]
        ops.assign(param, first)


__all__ = ["ClusterEnvironment", "broadcast_parameters", "is_msrun_scheduler", "join_cluster", "leave_cluster",
           "msrun_workers", "resolve_environment", "serve_if_scheduler", "user_node_timeout"]
