"""SIGINT / SIGTERM during fit: stop after the current optimizer step, checkpoint, exit cleanly."""

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Interrupted(Exception):
    """Raised inside fit after SIGINT/SIGTERM, once the checkpoint is written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_requests(request_stop: Callable[[int], None]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM call `request_stop(signum)` instead of killing the process.

    The trainer then stops after the current optimizer step and ends the process
    (SystemExit 128 + signal) once the checkpoint is written. Once MindSpore has run
    a graph, its own SIGINT handler turns Ctrl-C into SIGTERM, so the two cannot be
    told apart and are treated alike. Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: request_stop(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_if_interrupted(trainer) -> None:
    """After SIGINT/SIGTERM: writes a resumable checkpoint (when checkpointing is on) and ends fit.

    With several workers, only a stop they agreed on (`modes.agree_on_stopping`) ends fit, and all wait
    for rank 0's checkpoint before leaving (msrun ends every worker once one has exited).
    """
    if trainer._interrupt_signal is None or (trainer.world_size > 1 and not trainer._stop_agreed):
        return
    callback = trainer.checkpoint_callback
    if callback is not None:
        path = callback.new_path(f"interrupted-epoch={trainer.state.current_epoch}-step={trainer.state.global_step}")
        trainer.save_checkpoint(path)
        if trainer.world_size > 1:
            from lightms.distributed.reduction import any_worker

            any_worker([False])  # a barrier: rank 0's checkpoint is written before any worker leaves
        where = f"a checkpoint that resumes exactly is at {path} (fit(..., ckpt_path=that path))"
    else:
        where = "checkpointing is off, so no checkpoint was written"
    # SIGINT and SIGTERM are indistinguishable once MindSpore runs (see stop_requests).
    print(f"lightms: SIGINT/SIGTERM received; stopped after optimizer step {trainer.state.global_step}; {where}.",
          file=sys.stderr)
    raise Interrupted(trainer._interrupt_signal)
