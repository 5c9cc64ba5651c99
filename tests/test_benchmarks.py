"""The benchmark's pairing statistics (`benchmarks/run.py`), on simulated timings with a known answer."""

import importlib
import os
import statistics
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def run():
    environment = dict(os.environ)  # run.py sets ONEDNN_MAX_CPU_ISA and GLOG_v for its workers
    sys.path.insert(0, BENCH_DIR)
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(BENCH_DIR)
        os.environ.clear()
        os.environ.update(environment)


@pytest.mark.parametrize("batches, chunk, expected", [
    (40, 1, [10, 20, 30, 40]),  # the MLP at sink_size=1: four equal blocks, not 12, 12, 12, 4
    (20, 1, [10, 20]),  # LeNet
    (40, 10, [10, 20, 30, 40]),  # sink_size=10: whole chunks
    (40, 40, [40]),  # sink_size="epoch": one block per epoch
    (30, 1, [10, 20, 30]),  # 2.5 blocks wanted: the tie goes to more blocks
    (7, 3, [7]),  # a short last chunk stays whole
])
def test_block_ends_are_equal_blocks_of_whole_chunks(run, batches, chunk, expected):
    assert run.block_ends(batches, chunk) == expected


class SimulatedMachine:
    """A clock, and two models whose first step after the other model's block costs `switch` more."""

    def __init__(self, variant_step: float, reference_step: float, switch: float):
        self.now = 0.0
        self.steps = {"variant": variant_step, "reference": reference_step}
        self.switch = switch
        self.last = "variant"

    def train(self, side: str, count: int) -> None:
        self.now += count * self.steps[side] + (self.switch if side != self.last else 0.0)
        self.last = side


class SimulatedReference:
    def __init__(self, machine: SimulatedMachine, batches: int):
        self.machine = machine
        self.batches = [None] * batches

    def run_batches(self, start: int, stop: int) -> float:
        begin = self.machine.now
        self.machine.train("reference", stop - start)
        return self.machine.now - begin


def simulate(run, monkeypatch, variant_step, reference_step, switch, batches=40, epochs=6):
    machine = SimulatedMachine(variant_step, reference_step, switch)
    monkeypatch.setattr(run.time, "perf_counter", lambda: machine.now)
    pairing = run.Pairing(SimulatedReference(machine, batches), warmup=1)
    for _ in range(epochs):
        pairing.epoch_start()
        for done in range(1, batches + 1):
            machine.train("variant", 1)
            if pairing.due(done) or done == batches:
                pairing.trained(done, lambda: None, epoch_end=done == batches)
    return pairing.pairs


def test_crossover_estimate_cancels_the_cost_of_switching_models(run, monkeypatch):
    pairs = simulate(run, monkeypatch, variant_step=4.4, reference_step=4.0, switch=0.6)
    assert len(pairs) == 5 * 4
    assert {pair[3] for pair in pairs} == {True, False}  # both orders
    # The side that ran second pays the switch: one order reads high, the other low.
    first = statistics.median(p[0] / p[1] for p in pairs if p[3])
    second = statistics.median(p[0] / p[1] for p in pairs if not p[3])
    assert first == pytest.approx(44.0 / 40.6) and second == pytest.approx(44.6 / 40.0)
    assert run.paired_estimate(pairs) == pytest.approx(1.1, rel=2e-3)


def test_identical_sides_read_one(run, monkeypatch):
    pairs = simulate(run, monkeypatch, variant_step=4.0, reference_step=4.0, switch=0.6)
    assert run.paired_estimate(pairs) == pytest.approx(1.0, abs=1e-12)


def test_paired_estimate_weighs_the_two_orders_alike(run):
    # Three pairs with the variant first at 1.0 and one with it second at 1.21: the pooled median would read
    # 1.0; the crossover estimate gives each order's median the same weight.
    pairs = [[1.0, 1.0, 10, True]] * 3 + [[1.21, 1.0, 10, False]]
    assert run.paired_estimate(pairs) == pytest.approx(1.1)


def test_paired_estimate_without_both_orders_is_the_median(run):
    assert run.paired_estimate([[1.1, 1.0, 10, True], [1.3, 1.0, 10, True], [1.2, 1.0, 10, True]]) == \
        pytest.approx(1.2)
    assert run.paired_estimate([]) is None
