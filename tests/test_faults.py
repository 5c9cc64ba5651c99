"""Fault injection (`benchmarks/faults.py`), a few seeds: kills at random moments, SIGTERMs, a full disk.

Each trial runs training in a child process and interferes with it; the checks are
independent of lightms's own account: every checkpoint file on disk must load, the run
resumed with `ckpt_path="last"` must end with the parameters of an uninterrupted run
(to 1e-6), and a failed write must leave the earlier files byte for byte.
`python benchmarks/faults.py` runs hundreds of these.
"""

import importlib
import os
import random
import signal
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
CONFIG = "accumulate"  # 24 optimizer steps in windows of 2, a checkpoint (and last.ckpt) after each


@pytest.fixture(scope="module")
def faults():
    sys.path.insert(0, BENCH_DIR)
    try:
        yield importlib.import_module("faults")
    finally:
        sys.path.remove(BENCH_DIR)


@pytest.fixture(scope="module")
def reference(faults, tmp_path_factory):
    """The uninterrupted run's final parameters."""
    return faults.train(str(tmp_path_factory.mktemp("reference")), CONFIG)


def assert_clean(counts):
    print(counts.values)  # shown when a test fails
    assert counts.problems == []
    assert counts.values["resumes exact"] == counts.values["resumes"] > 0
    assert counts.values["unloadable checkpoints"] == counts.values["files lost"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_loses_nothing_and_resumes_exactly(faults, reference, tmp_path, seed):
    counts = faults.Counts()
    rng = random.Random(seed)
    for _ in range(2):  # killed, resumed and killed again, then resumed to the end
        faults.kill_trial(str(tmp_path), CONFIG, rng, counts, signal.SIGKILL, train_seconds=0.6, early=0.0)
    faults.check_resume(str(tmp_path), CONFIG, reference, counts, in_process=True)
    assert_clean(counts)
    assert counts.values["kills"] + counts.values["runs that ended before their kill"] == 2
    assert counts.values["checkpoints checked"] > 0


@pytest.mark.parametrize("signal_at", [None, "validation:3", "on_train_end"])
def test_sigterm_at_random_moments_in_validation_and_after_the_last_step_exits_143_and_resumes(
        faults, reference, tmp_path, signal_at):
    counts = faults.Counts()
    faults.kill_trial(str(tmp_path), CONFIG, random.Random(7), counts, signal.SIGTERM, signal_at=signal_at,
                      train_seconds=0.6, early=0.0)
    assert counts.values["sigterms"] == counts.values["sigterm exits 143"] == 1
    names = [os.path.basename(path) for path in faults.checkpoints(str(tmp_path))]
    assert any(name.startswith("interrupted-") for name in names), names
    if signal_at == "on_train_end":
        assert "interrupted-epoch=4-step=24.ckpt" in names
    faults.check_resume(str(tmp_path), CONFIG, reference, counts, in_process=True)
    assert_clean(counts)


def test_a_full_disk_keeps_the_previous_checkpoints_and_leaves_no_partial_file(faults, reference, tmp_path):
    counts = faults.Counts()
    faults.full_disk_trial(str(tmp_path), CONFIG, reference, counts, in_process=True)
    assert counts.values["full-disk checks clean"] == 1
    assert_clean(counts)
