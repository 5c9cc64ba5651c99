"""Imports MindSpore quietly and exposes the few internals lightms reads.

MindSpore prints `[WARNING]` lines for routine events (a deprecated fused
optimizer, a re-created jit function) unless `GLOG_v` is set before it is
imported. lightms sets `GLOG_v=3` (errors only) when the user has not chosen a
level, so a run's output is the user's own. Set `GLOG_v` yourself before
importing lightms to see MindSpore's logs again.
"""

import os
import shutil
import tempfile
from typing import Optional

os.environ.setdefault("GLOG_v", "3")

import mindspore  # noqa: E402  (must come after GLOG_v is set)


class GraphDumpGuard:
    """Moves MindSpore's compile-failure report out of the working directory.

    A graph that fails to compile makes MindSpore write `rank_<rank>/om/analyze_fail.ir`
    into the working directory, whatever `save_graphs_path` says (seen with 2.10; the
    rank is the data-parallel worker's, 0 in one process). When a run fails and leaves
    its rank's folder that was not there before, the guard moves it under the temp
    folder and says where it went; other workers' folders in a shared directory are theirs.

    Args:
        rank: This process's data-parallel rank.
    """

    def __init__(self, rank: int = 0):
        self.folder = os.path.join(os.getcwd(), f"rank_{rank}")
        self.existed = os.path.exists(self.folder)

    def tidy(self) -> Optional[str]:
        """Moves this rank's folder if created since construction; returns its new path, or None."""
        if self.existed or not os.path.isdir(self.folder):
            return None
        target = tempfile.mkdtemp(prefix="lightms-analyze-fail-")
        try:
            shutil.move(self.folder, target)
        except OSError:  # gone or unmovable: the run's own error matters more than this tidying
            return None
        return os.path.join(target, os.path.basename(self.folder))


def compiled_graph_count() -> int:
    """Returns how many graphs MindSpore has compiled in this process so far.

    Reads the caches of compiled phases MindSpore keeps for `mindspore.jit`
    functions and for Cells run as whole graphs (lightms's steps); used by tests
    and benchmarks to show that an epoch triggers no recompilation.

    Returns:
        The number of distinct compiled graphs, or -1 if this MindSpore version
        keeps its cache elsewhere.
    """
    try:
        from mindspore.graph.api import cells_compile_cache, ms_compile_cache
    except ImportError:  # pragma: no cover - other MindSpore versions
        return -1
    return len(ms_compile_cache) + sum(len(phases) for phases in cells_compile_cache.values())


__all__ = ["mindspore", "compiled_graph_count", "GraphDumpGuard"]
