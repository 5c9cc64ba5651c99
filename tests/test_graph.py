"""Whole-graph step functions: one memory release per compilation, and what the release gives back."""

import sys

import numpy as np
import pytest
from mindspore import Tensor, ops

from lightms.step import graph


def resident_mib() -> float:
    """The process's resident memory now, from the kernel's own accounting."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_release_returns_freed_heap_pages_to_the_system():
    # 200 MiB in 64 KiB blocks (below glibc's mmap threshold, so they live on the heap); every
    # 16th block stays alive, so the freed pages sit between live ones, where free() keeps them.
    blocks = [np.ones(16 * 1024, np.float32) for _ in range(3200)]
    kept = blocks[::16]
    del blocks
    before = resident_mib()
    assert graph.release_freed_memory() is True
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert all(float(block[0]) == 1.0 for block in kept)  # live blocks are untouched


def double(x):
    return ops.mul(x, 2.0)


def test_memory_is_released_once_per_compiled_graph(monkeypatch):
    releases = []
    monkeypatch.setattr(graph, "release_freed_memory", lambda: releases.append(1))
    run = graph.compile_function(double, compile=True)
    np.testing.assert_allclose(run(Tensor(np.ones((2, 3), np.float32))).asnumpy(), 2.0)
    assert len(releases) == 1
    run(Tensor(np.zeros((2, 3), np.float32)))  # same signature: MindSpore's cached graph, no compile
    assert len(releases) == 1
    run(Tensor(np.ones((4, 3), np.float32)))  # a new shape compiles a second graph
    assert len(releases) == 2
