"""Running a Python step function as one compiled MindSpore graph, and the memory its compilation frees."""

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from lightms._mindspore import mindspore as ms
from mindspore import Tensor, nn


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

    Args:
        fn: The step function.
        explain_failure: Given what MindSpore raised when compiling a graph or in its first run,
            returns a clearer error to raise instead, or None to let MindSpore's propagate.
    """

    def __init__(self, fn: Callable, explain_failure: Optional[Callable[[Exception], Optional[Exception]]] = None):
        super().__init__(auto_prefix=False)
        self.fn = fn
        self.explain_failure = explain_failure
        self._new_graph = False  # compiled in this call, or its compilation failed: not yet run once

    def construct(self, *inputs):
        return self.fn(*inputs)

    def compile_and_run(self, *args, **kwargs):
        """Compiles (once per input signature) and runs the graph.

        A failure while compiling or in a new graph's first run is shown to `explain_failure`;
        a failure of a graph that ran before is MindSpore's own (out of memory, say) and
        propagates as it is.
        """
        try:
            output = nn.Cell.compile_and_run(self, *args, **kwargs)
        except Exception as error:  # MindSpore's, from compiling or from running Python it fell back to
            clearer = self.explain_failure(error) if self._new_graph and self.explain_failure else None
            if clearer is None:
                raise
            raise clearer from None  # the user's mistake first; the clearer error carries MindSpore's text
        if self._new_graph:
            self._new_graph = False
        return output

    def compile(self, *args, **kwargs):
        """Compiles the graph for these inputs unless MindSpore has it already (called on every run)."""
        graphs_before = len(self.compile_cache)
        try:
            super().compile(*args, **kwargs)
        except Exception:
            self._new_graph = True
            raise
        if len(self.compile_cache) != graphs_before:
            self._new_graph = True
            release_freed_memory()


def compile_function(fn: Callable, compile: bool,
                     explain_failure: Optional[Callable[[Exception], Optional[Exception]]] = None) -> Callable:
    """Returns `fn` compiled as a whole graph (see `GraphFunction`), or `fn` itself when `compile` is False."""
    return GraphFunction(fn, explain_failure).compile_and_run if compile else fn


@dataclass(frozen=True)
class BatchPassing:
    """How a step function receives a batch: as positional inputs, rebuilt into the batch inside the step.

    MindSpore treats separate Tensor arguments of a graph as variable inputs. A tuple,
    list or dict argument is a constant, baked into the graph and recompiled for every
    batch, unless it is wrapped in `mindspore.mutable`. The wrapped tuple cost 0.3-3.6%
    of an MLP step on the CPU backend against separate Tensors (the `mutable` call and
    the graph's handling of it; six interleaved runs of one graph both ways), though in
    the full benchmark the difference was within its noise. So a Tensor, or a flat tuple
    or list of Tensors (the usual `(x, y)`), goes in as separate Tensors; any other
    batch (nested, a dict) as one `mutable` input; and a step that is not compiled
    gets the batch as it is.

    Attributes:
        pack: On the host: batch -> the step's positional inputs (a tuple or list).
        unpack: Inside the step (graph-parseable): the positional inputs -> the batch.
    """

    pack: Callable
    unpack: Callable


def batch_passing(example, compiled: bool) -> BatchPassing:
    """The BatchPassing for batches structured like `example` (a batch whose leaves are Tensors)."""
    if not compiled or isinstance(example, Tensor):
        return BatchPassing(_alone, _first)
    if type(example) in (tuple, list) and all(isinstance(leaf, Tensor) for leaf in example):
        return BatchPassing(_itself, _as_tuple if type(example) is tuple else _as_list)
    return BatchPassing(_mutable_alone, _first)


def _alone(batch):
    return (batch,)


def _itself(batch):
    return batch


def _mutable_alone(batch):
    return (ms.mutable(batch),)


def _first(*inputs):
    return inputs[0]


def _as_tuple(*inputs):
    return inputs


def _as_list(*inputs):
    return list(inputs)


__all__ = ["BatchPassing", "GraphFunction", "batch_passing", "compile_function", "release_freed_memory"]
