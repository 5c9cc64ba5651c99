"""A bound on waiting for a worker that died or hangs.

On one machine msrun ends the other workers when one exits. Across machines nobody does: a
worker whose peer died waits in its next collective until the collective gives up. MindSpore's
CPU collectives give up after `MS_CPU_COMM_OP_TIMEOUT` (which lightms sets from the strategy's
timeout); other backends' may wait forever. So each worker keeps a watchdog thread: when this
worker has made no progress (a chunk of steps, a validation, an agreement of the workers) for
`timeout` seconds, it says so and ends this worker's process, which msrun then reports and the
rest of the run follows (PyTorch's process-group timeout plays this part in Lightning).
"""

import os
import sys
import threading
import time
from typing import Callable, Optional


class Watchdog:
    """Ends this process when `beat` (this worker made progress) has not been called for `timeout` seconds.

    Args:
        timeout: Seconds this worker may go without progress.
        rank: This worker's rank, for the message.
        end: Ends the process with an exit code (`os._exit`: the main thread may be stuck in a
            collective, where no Python exception or signal handler can reach it).
    """

    def __init__(self, timeout: float, rank: int, end: Callable[[int], None] = os._exit):
        self.timeout, self.rank, self._end = timeout, rank, end
        self._last, self._where = time.monotonic(), ("the start of fit", ())
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        """Starts watching (a daemon thread); returns self."""
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="lightms-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, where: str, *args) -> None:
        """Records that this worker got past `where % args` ("epoch %d, step %d", 2, 40) just now (formatted only
        when reported: a beat is made once per chunk)."""
        self._last, self._where = time.monotonic(), (where, args)

    def stop(self) -> None:
        """Stops watching (at the end of fit, however it ended)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout:
                where, args = self._where
                print(f"lightms: worker {self.rank} stops: it has made no progress for {waited:.0f} s (last past "
                      f"{where % args if args else where}), so a worker has died or is stuck (this one or another: "
                      "see the workers' logs). Ending this worker with exit code 1; if a step, a validation or a "
                      "checkpoint legitimately takes longer, raise Trainer(strategy=DDPStrategy(timeout=seconds)).",
                      file=sys.stderr, flush=True)
                self._end(1)
                return


# How MindSpore's CPU collectives report a peer that did not answer within MS_CPU_COMM_OP_TIMEOUT.
_COLLECTIVES = ("AllReduce", "AllGather", "Broadcast", "ReduceScatter")


def explain_collective_failure(error: BaseException, rank: int, where: str, timeout: float) -> Optional[RuntimeError]:
    """A clear error for MindSpore's failure of a collective (its kernel's launch), or None for other errors.

    Args:
        error: What fit raised.
        rank: This worker's rank.
        where: Where the run was ("epoch 2, step 40").
        timeout: The strategy's timeout, in seconds.
    """
    message = str(error)
    if not isinstance(error, RuntimeError) or "Launch kernel failed" not in message or not any(
            name in message for name in _COLLECTIVES):
        return None
    first = next((line for line in message.splitlines() if "Launch kernel failed" in line), message)
    return RuntimeError(f"lightms: worker {rank} stops at {where}: a collective with the other workers failed "
                        f"(MindSpore: {first.strip()!r}), so a worker has died or did not answer within "
                        f"{timeout:.0f} s (this one or another: see the workers' logs). If a step, a validation or a "
                        "checkpoint legitimately takes longer, raise Trainer(strategy=DDPStrategy(timeout=seconds)).")


__all__ = ["Watchdog", "explain_collective_failure"]
