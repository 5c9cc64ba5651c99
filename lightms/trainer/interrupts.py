"""SIGINT / SIGTERM during fit: stop after the current optimizer step, checkpoint, exit cleanly."""

import signal
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
