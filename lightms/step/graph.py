"""Running a Python step function as one compiled MindSpore graph, and the memory its compilation frees."""

import ctypes
import ctypes.util
import sys
from typing import Callable

from lightms._mindspore import mindspore  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import nn


def release_freed_memory() -> bool:
    """Hands the C heap's freed pages back to the operating system (glibc's `malloc_trim`).

    MindSpore's graph compiler frees most of what it allocates, but glibc keeps the
    freed pages in the process: they count in its resident memory (RSS) for the rest
    of the run. Measured on this project's machine: 5 MiB after compiling an MLP train
    step and 30 MiB after compiling its sunk (looping) form, which was a third of what
    sinking added to the peak RSS. Returning them is cheap (milliseconds) and is done
    once per compiled graph. Elsewhere than glibc (macOS, Windows, musl) there is no
    such call and nothing happens.

    Returns:
        Whether memory could be released.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


class GraphFunction(nn.Cell):
    """Runs a Python function as one whole-graph Cell.

    `Cell.compile_and_run` executes on MindSpore's graph executor, as a Cell does in
    GRAPH_MODE, without changing the process's execution mode. A `mindspore.jit`
    function instead goes through the PyNative executor (`grad_jit`), which cost
    about 8 ms per call on this project's CPU: a 784-512-512-10 MLP step took 12 ms
    that way and 3-4 ms as a Cell, with identical losses. After each compilation the
    compiler's freed memory goes back to the system (`release_freed_memory`).
    """

    def __init__(self, fn: Callable):
        super().__init__(auto_prefix=False)
        self.fn = fn

    def construct(self, *inputs):
        return self.fn(*inputs)

    def compile(self, *args, **kwargs):
        """Compiles the graph for these inputs unless MindSpore has it already (called on every run)."""
        graphs_before = len(self.compile_cache)
        super().compile(*args, **kwargs)
        if len(self.compile_cache) != graphs_before:
            release_freed_memory()


def compile_function(fn: Callable, compile: bool) -> Callable:
    """Returns `fn` compiled as a whole graph, or `fn` itself when `compile` is False."""
    return GraphFunction(fn).compile_and_run if compile else fn


__all__ = ["GraphFunction", "compile_function", "release_freed_memory"]
