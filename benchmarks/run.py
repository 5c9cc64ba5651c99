"""Compares lightms with hand-written MindSpore and `mindspore.train.Model`: time per micro-batch and peak RSS.

For each model, an MLP 784-512-512-10 (batch 128) and a LeNet-5 (1x32x32 input,
batch 64), all trained with `nn.Adam(learning_rate=1e-3)` and
`nn.CrossEntropyLoss` on the same seeded numpy batches from the same initial
weights, these variants are measured side by side in one run:

* `ref`: the reference, a hand-written compiled train step as a
  performance-minded MindSpore user writes it: a Cell whose `construct` runs
  `value_and_grad` + `nn.Adam` joined by `ops.depend`, run as a whole graph
  (`Cell.compile_and_run`, what calling it under GRAPH_MODE does; measured the
  same), batches converted to Tensors once (`overhead.ReferenceLoop`);
* `ref-jit`: the same step as a `mindspore.jit(jit_level="O1")` function, the
  other form the issue allows; a baseline only. On this CPU backend it is 2-4x
  slower per step than the whole-graph Cell (every call goes through the PyNative
  executor's `grad_jit`), which is why `ref` is the Cell;
* `ref-acc4`: `ref` with accumulation over 4 micro-batches: a window step Cell
  adds each micro-batch's gradients into Parameters (`HyperMap` + `ops.assign_add`), an optimizer step Cell adds the window's last micro-batch,
  applies the average (divided by the micro-batches the window really holds) and
  empties them. It is the reference of the `accumulate=4` rows (their losses must
  equal its loss; their time per micro-batch is compared with its time per
  micro-batch);
* `ms-graph-nosink`, `ms-graph-sink`, `ms-pynative-nosink`, `ms-pynative-sink`:
  `mindspore.train.Model.train` over a `NumpySlicesDataset` of the same batches
  (no shuffle, `.batch(batch_size)`), `dataset_sink_mode=False` / `True`, under
  GRAPH_MODE (as a performance-minded MindSpore user runs it) and in the default
  PyNative mode. On CPU MindSpore ignores `dataset_sink_mode=True` (see the
  platform notes); the table's notes give the steps and step-end callbacks
  actually seen per epoch. PyNative convolutions differ from GRAPH_MODE ones in
  the 4th decimal of the LeNet loss;
* `lightms-sink1`, `lightms-sink10`, `lightms-sinkepoch`: `lightms.Trainer.fit`
  with `sink_size=1 | 10 | "epoch"`, TensorBoard logger and progress bar on (the
  bar is drawn to /dev/null), `log_every_n_steps=50`, the loss logged every step;
* `lightms-sink1-acc4`, `lightms-sinkepoch-acc4`: the same with `accumulate=4`;
* `lightms-sink1-p16-mixed`, ...: the same under each precision in
  `PRECISIONS` other than "32" (the 32-bit row is `lightms-sink1`).

Any variant can be named on the command line as `lightms-sink{N|epoch}[-acc{K}]
[-p{PRECISION}]`, `ref`, `ref-acc{K}` or `ms-{graph|pynative}-{sink|nosink}`.

How it is measured:

* Peak RSS is per process, so every (variant, model) runs in its own
  subprocess (`run.py --worker VARIANT --model M ...`), which prints one JSON
  line: per-epoch times, losses, graphs compiled, and peak RSS
  (`getrusage(RUSAGE_SELF).ru_maxrss`). Workers run one at a time.
* Paired timing: every non-reference variant also runs in a second, paired
  worker, which builds the variant's reference loop too. The epoch is cut into
  equal blocks of whole sunk chunks, about 12 micro-batches each (10 for both
  models here); whenever the variant has trained a block, it is synchronised and
  timed, and the reference trains on the same batches and is timed (`Pairing`).
  This machine's speed moves by 20-60% within seconds, in phases of a few dozen
  steps (other tenants of the host): two rows timed in separate processes one
  after the other can differ by more than lightms's whole overhead, while a
  block pair (about 0.1 s) mostly falls in one phase.
* Order: the side that runs right after the other's block pays a switching
  cost on its first step (about 0.6 ms of a 4.5 ms MLP step, either side alike),
  so the order alternates, A B B A, and the paired ratio is a crossover
  estimate (`paired_estimate`): the geometric mean of the median block ratio
  (variant's time per micro-batch over the reference's) when the variant ran
  first and when it ran second, over all block pairs of all rounds. The cost
  then cancels. (Blocks of 12, 12, 12 and 4 micro-batches, as until
  2026-11-24, put the short block, with three times the cost per micro-batch,
  always on the variant's side.)
* A/A: the `ref` and `ref-acc4` rows' paired workers pair the reference with
  an identical copy of itself; their paired ratio shows what the method reads
  when there is no difference. On the MLP it reads about 0.97: the measured
  side of a pair comes out faster than an identical reference, whichever copy
  is measured (cause not found). So the ratio the targets are judged on is the
  row's paired ratio divided by its reference's A/A ratio; both are printed.
* Rounds: each round runs every variant once (in reverse order on odd rounds),
  so drifts in the machine's load hit all variants alike. `--repeats` rounds
  (default 3).
* In a worker: one warm-up epoch (compilation, first calls) is not timed; then
  `--epochs` timed epochs. An epoch's time ends with a host sync (one parameter
  read with `.asnumpy()`). Time per micro-batch is the median timed epoch over
  the batches per epoch (unpaired workers); the table gives the median over
  rounds of that. The RSS column is the median over rounds of the unpaired
  workers' peak RSS. Ratios are to the row's reference.
* Same data and weights everywhere: numpy batches from `overhead.make_batches`;
  `lightms.seed_everything(0)` (MindSpore, its datasets, numpy, random) runs
  right before the network is built, in every row alike, and every
  worker reports a hash of the initial weights, which must be equal across a
  model's rows.
* Losses: "final loss" is the loss of the trained weights on the first batch,
  computed the same way (PyNative forward) in every worker, so it compares the
  weights the variants ended with; the loss of the last training step is in the
  notes. Rows whose maths equals their reference's must agree to 5 decimals
  (|difference| <= 1e-5).
* Graphs compiled (`lightms.compiled_graph_count()`: `mindspore.jit` functions
  plus Cells compiled as whole graphs, which `Model.train` and lightms use), in
  the whole worker process, and how many of them came after the warm-up epoch
  (must be 0).
* Targets (time ratios paired, divided by the A/A ratio): `sink_size=1` at most 1.05x `ref`; with sinking
  at most 1.00x `ref` and faster than every `Model.train` row measured; `accumulate=4` at most 1.05x
  `ref-acc4` per micro-batch; peak RSS of every lightms row at most 1.10x its
  reference's; every lightms row's loss equal to its reference's (except under
  another precision); no compilation after the warm-up. Precision rows have no
  time target (float16 is not faster on this CPU backend). The references and
  `Model.train` rows are baselines, without targets.
* Environment: `ONEDNN_MAX_CPU_ISA=AVX2` (fast convolutions on AVX-512 CPUs)
  and `GLOG_v=3` are set, unless already set, for every worker alike. Workers
  run in a scratch directory (MindSpore writes `rank_0/` and
  `rewritten_network/` into the working directory). Every worker imports
  `overhead.py` for the models and data, and through it lightms: about 1.6 MiB
  of RSS, also in the reference rows.

Run it from the repository root:

    python benchmarks/run.py                        # full run, about 15 minutes on 2 cores
    python benchmarks/run.py --quick                # smoke run, tiny epochs, one round
    python benchmarks/run.py --models mlp --variants 'ref,ms-graph-*,lightms-sink*' --repeats 5
    python benchmarks/run.py --markdown results.md  # also write the tables to a file
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before MindSpore runs a conv kernel; inherited by workers
os.environ.setdefault("GLOG_v", "3")  # before MindSpore is imported: no routine warnings

import argparse  # noqa: E402
import contextlib  # noqa: E402
import fnmatch  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Union  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SEED = 0
LEARNING_RATE = 1e-3

# What to compare; edit these lists to change the default run.
SINK_SIZES: List[Union[int, str]] = [1, 10, "epoch"]
ACCUMULATE = 4
ACCUMULATE_SINK_SIZES: List[Union[int, str]] = [1, "epoch"]
PRECISIONS: List[str] = ["32", "16-mixed"]  # the precisions lightms supports on CPU; "32" is lightms-sink1

# Micro-batches per epoch and timed epochs (after one warm-up epoch).
BATCHES = {"mlp": 40, "lenet": 20}
QUICK_BATCHES = {"mlp": 8, "lenet": 8}
TIMED_EPOCHS, QUICK_TIMED_EPOCHS = 5, 2
# Paired workers of rows with a time target (and the A/A rows) time more epochs: one block pair
# reads within about +-15% here, so the median of 60 pairs moves by about 2.5% from run to run.
PAIRED_EPOCHS = 15

# Targets (ratios to the row's reference).
SINK1_TARGET = 1.05
SINKING_TARGET = 1.00
ACCUMULATE_TARGET = 1.05
PAIR_BLOCK = 12  # about this many micro-batches per paired block (`block_ends`: 10 for both models here; with
# accumulate=4 the blocks the variant runs first hold 2 optimizer steps and the others 3: each pair compares the same
# batches, but the two orders' medians are not of like blocks)
RSS_TARGET = 1.10
LOSS_TOLERANCE = 1e-5  # "agree to 5 decimals"

RESULT_PREFIX = "RUN.PY-RESULT "
MODEL_TITLES = {"mlp": "MLP 784-512-512-10, batch 128", "lenet": "LeNet-5, batch 64"}


# ---- variants ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One way of training a model.

    Attributes:
        name: Command-line name, e.g. "lightms-sinkepoch-acc4".
        kind: "reference", "model" (mindspore.train.Model) or "lightms".
        accumulate: Micro-batches per optimizer step.
        mode: For "model": "graph" or "pynative".
        sink: For "model": `dataset_sink_mode`; for "lightms": `sink_size` (int or "epoch").
        precision: For "lightms": the Trainer's precision.
    """

    name: str
    kind: str
    accumulate: int = 1
    mode: str = "graph"
    sink: Union[bool, int, str] = False
    precision: str = "32"

    @property
    def reference(self) -> str:
        """The variant this one's time, RSS and loss are compared with."""
        return f"ref-acc{self.accumulate}" if self.accumulate > 1 else "ref"

    @property
    def same_maths(self) -> bool:
        """Whether its loss must equal its reference's."""
        return self.precision == "32"

    @property
    def sinks(self) -> bool:
        """Whether this is a lightms row with more than one micro-batch per graph call."""
        return self.kind == "lightms" and self.sink != 1

    def chunk(self, batches_per_epoch: int) -> int:
        """Micro-batches per host call: a paired block never splits one."""
        if not self.sinks:
            return 1
        return batches_per_epoch if self.sink == "epoch" else min(int(self.sink), batches_per_epoch)


_LIGHTMS_NAME = re.compile(r"^lightms-sink(\d+|epoch)(?:-acc(\d+))?(?:-p(.+))?$")
_REFERENCE_NAME = re.compile(r"^ref(?:-acc(\d+)|-(jit))?$")
_MODEL_NAME = re.compile(r"^ms-(graph|pynative)-(sink|nosink)$")


def parse_variant(name: str) -> Variant:
    """Builds the Variant a command-line name stands for.

    Args:
        name: e.g. "ref", "ref-acc4", "ms-graph-sink", "lightms-sink10-acc4-p16-mixed".

    Returns:
        The variant.

    Raises:
        ValueError: If the name fits none of the patterns.
    """
    match = _REFERENCE_NAME.match(name)
    if match:
        return Variant(name, "reference", accumulate=int(match.group(1) or 1),
                       mode="jit" if match.group(2) else "graph")
    match = _MODEL_NAME.match(name)
    if match:
        return Variant(name, "model", mode=match.group(1), sink=match.group(2) == "sink")
    match = _LIGHTMS_NAME.match(name)
    if match:
        sink = match.group(1) if match.group(1) == "epoch" else int(match.group(1))
        return Variant(name, "lightms", accumulate=int(match.group(2) or 1), sink=sink,
                       precision=match.group(3) or "32")
    raise ValueError(f"unknown variant {name!r}: expected ref, ref-accK, ms-graph|pynative-sink|nosink or "
                     f"lightms-sinkN|epoch[-accK][-pPRECISION]")


def lightms_name(sink: Union[int, str], accumulate: int = 1, precision: str = "32") -> str:
    """Returns the variant name of a lightms configuration."""
    name = f"lightms-sink{sink}"
    if accumulate > 1:
        name += f"-acc{accumulate}"
    if precision != "32":
        name += f"-p{precision}"
    return name


def default_variants(sink_sizes: Sequence[Union[int, str]], precisions: Sequence[str]) -> List[str]:
    """Returns the names of the variants a full run measures, references first.

    Args:
        sink_sizes: The lightms sink sizes.
        precisions: The lightms precisions ("32" is the sink_size=1 row itself).
    """
    names = ["ref", "ref-jit", f"ref-acc{ACCUMULATE}"]
    names += [f"ms-{mode}-{sink}" for mode in ("graph", "pynative") for sink in ("nosink", "sink")]
    names += [lightms_name(sink) for sink in sink_sizes]
    names += [lightms_name(sink, ACCUMULATE) for sink in ACCUMULATE_SINK_SIZES]
    names += [lightms_name(1, precision=p) for p in precisions if p != "32"]
    return list(dict.fromkeys(names))


def select_variants(patterns: Optional[str], defaults: List[str]) -> List[str]:
    """Filters the default variants by comma-separated names or shell patterns, adding their references.

    A name that is not among the defaults but parses (e.g. "lightms-sink5") is added.

    Args:
        patterns: e.g. "ref,ms-graph-*,lightms-sink1"; None keeps all defaults.
        defaults: The default variant names.

    Returns:
        The selected names, references first, each once.

    Raises:
        ValueError: If a pattern matches nothing and is not a variant name.
    """
    if not patterns:
        chosen = list(defaults)
    else:
        chosen = []
        for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
            matches = fnmatch.filter(defaults, pattern)
            if not matches:
                parse_variant(pattern)  # raises for a non-name
                matches = [pattern]
            chosen += matches
    references = [parse_variant(name).reference for name in chosen]
    return list(dict.fromkeys(references + chosen))


# ---- worker: helpers -------------------------------------------------------------------------------

def graphs_compiled() -> int:
    """Graphs MindSpore has compiled in this process: jit functions plus whole-graph Cells."""
    import lightms

    return lightms.compiled_graph_count()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def weights_hash(cell) -> str:
    """A short hash of the trainable parameters of `cell`, in order."""
    digest = hashlib.sha1()
    for parameter in cell.trainable_params():
        digest.update(parameter.asnumpy().tobytes())
    return digest.hexdigest()[:12]


def loss_on_batch(net, loss_fn, batch) -> float:
    """The loss of `net` on one numpy batch, computed in PyNative the same way in every worker."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    x, y = batch
    return float(loss_fn(net(ms.Tensor(x)), ms.Tensor(y)).asnumpy())


def graph_step(function):
    """Makes a train-step function a Cell run as a whole graph (`Cell.compile_and_run`)."""
    from mindspore import nn

    class Step(nn.Cell):
        def construct(self, *inputs):
            return function(*inputs)

    return Step().compile_and_run


class AccumulatingReference:
    """A hand-written train loop that accumulates gradients over `accumulate` micro-batches.

    A whole-graph window step Cell runs forward and backward and adds the
    gradients into Parameters; an optimizer step Cell runs the window's last
    micro-batch, divides the sum by the micro-batches in the window (the last
    window of an epoch may be shorter), applies Adam and zeroes the sums.

    Args:
        spec: The model (seed before constructing this).
        batches: The numpy batches of one epoch; converted to Tensors once.
        accumulate: Micro-batches per optimizer step.
    """

    def __init__(self, spec, batches, accumulate: int):
        import mindspore as ms
        import numpy as np
        from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

        self.net = spec.factory()
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = nn.Adam(self.net.trainable_params(), learning_rate=LEARNING_RATE)
        self.batches = [(Tensor(x), Tensor(y)) for x, y in batches]
        self.accumulate = accumulate
        net, loss_fn, optimizer = self.net, self.loss_fn, self.optimizer
        weights = optimizer.parameters
        sums = ParameterTuple(
            Parameter(Tensor(np.zeros(p.shape, ms.dtype_to_nptype(p.dtype))), name=f"acc.{p.name}",
                      requires_grad=False)
            for p in weights
        )
        hyper_map = ops.HyperMap()

        def forward(x, y):
            return loss_fn(net(x), y)

        grad_fn = ms.value_and_grad(forward, None, weights)

        def window_step(x, y):
            loss, grads = grad_fn(x, y)
            return ops.depend(loss, hyper_map(ops.assign_add, sums, grads))

        def optimizer_step(x, y, window_size):
            loss, grads = grad_fn(x, y)
            mean = hyper_map(ops.partial(_divide, window_size), hyper_map(ops.add, sums, grads))
            loss = ops.depend(loss, optimizer(mean))
            return ops.depend(loss, hyper_map(ops.assign, sums, hyper_map(ops.zeros_like, sums)))

        self.window_step = graph_step(window_step)
        self.optimizer_step = graph_step(optimizer_step)
        self.window_sizes = {k: Tensor(float(k), ms.float32) for k in range(1, accumulate + 1)}
        self.last_window_losses: List = []
        self._window: List = []  # losses of the open window's micro-batches

    def run_epoch(self) -> float:
        """Trains one epoch; returns its duration in seconds, synchronised."""
        return self.run_batches(0, len(self.batches))

    def run_batches(self, start: int, stop: int) -> float:
        """Trains on batches [start, stop) of the epoch; returns the duration in seconds, synchronised.

        A window may span two calls; the epoch's last batch always closes one.
        """
        from overhead import first_parameter_to_host

        begin = time.perf_counter()
        for i in range(start, stop):
            x, y = self.batches[i]
            if len(self._window) + 1 == self.accumulate or i == len(self.batches) - 1:
                self._window.append(self.optimizer_step(x, y, self.window_sizes[len(self._window) + 1]))
                self.last_window_losses, self._window = self._window, []
            else:
                self._window.append(self.window_step(x, y))
        first_parameter_to_host(self.net)
        return time.perf_counter() - begin

    def final_loss(self) -> float:
        """The mean loss of the last window (what lightms logs as the step's loss)."""
        return float(statistics.fmean(float(loss.asnumpy()) for loss in self.last_window_losses))


def _divide(denominator, value):
    return value / denominator


# ---- worker: one variant ----------------------------------------------------------------------

def build_reference(variant: Variant, spec, batches):
    """Seeds, then builds the hand-written loop of a reference variant (plain, accumulating or jit)."""
    import lightms
    from overhead import ReferenceLoop

    lightms.seed_everything(SEED)
    if variant.accumulate > 1:
        return AccumulatingReference(spec, batches, variant.accumulate)
    return ReferenceLoop(spec, batches, compile=True, use_jit=variant.mode == "jit")


def block_ends(batches_per_epoch: int, chunk: int, block: int = PAIR_BLOCK) -> List[int]:
    """Where the paired blocks of an epoch end: equal blocks of whole chunks, about `block` micro-batches each.

    Equal blocks keep the A B B A order balanced: whichever side runs right after the
    other's block pays a switching cost on its first step (about 0.6 ms here, either
    side alike), spread over the block. Blocks of 12, 12, 12 and 4 put the epoch's short
    block, with three times the cost per micro-batch, always on the same side.

    Args:
        batches_per_epoch: Micro-batches per epoch.
        chunk: Micro-batches per host call of the measured variant.
        block: The wanted micro-batches per block.

    Returns:
        The number of micro-batches done at each block's end, the last being the epoch's.
    """
    chunks = -(-batches_per_epoch // chunk)
    wanted = batches_per_epoch / block
    # The number of blocks: a divisor of the chunks, so that blocks are equal; the nearest to `wanted`.
    count = min((k for k in range(1, chunks + 1) if chunks % k == 0), key=lambda k: (abs(k - wanted), -k))
    per_block = chunks // count
    return [min((i + 1) * per_block * chunk, batches_per_epoch) for i in range(count)]


def paired_estimate(pairs: List[list]) -> Optional[float]:
    """The time ratio of the variant to its reference from block pairs (`Pairing.pairs`).

    A crossover estimate: the geometric mean of the median ratio of the pairs where the
    variant ran first and of those where it ran second. The side that runs right after
    the other's block pays a switching cost (`block_ends`); it inflates one order's
    ratios by as much as it deflates the other's, and the geometric mean cancels it. With
    pairs of one order only, the median of all.

    Returns:
        The ratio, or None without pairs.
    """
    if not pairs:
        return None
    medians = order_medians(pairs)
    if medians is not None:
        return math.sqrt(medians[0] * medians[1])
    return statistics.median(p[0] / p[1] for p in pairs)


def order_medians(pairs: List[list]) -> Optional[tuple]:
    """(median block ratio when the variant ran first, when it ran second), or None without both orders."""
    by_order = [[p[0] / p[1] for p in pairs if p[3] == first] for first in (True, False)]
    return (statistics.median(by_order[0]), statistics.median(by_order[1])) if all(by_order) else None


class Pairing:
    """Times the measured variant against its reference in alternating blocks of micro-batches, in one process.

    The machine's speed moves by 20-60% within seconds, in phases of a few dozen
    steps (other tenants of the host; per-step times here flip between about 2.5 and
    4.2 ms on the MLP), so two rows timed in separate processes, or even in
    alternating epochs, can differ by more than lightms's whole overhead. Here the
    epoch is cut into equal blocks of whole sunk chunks (`block_ends`); whenever the
    variant has trained a block, it is synchronised and its block time taken; the
    reference loop trains on the same batches of the epoch and is timed,
    synchronised too. A block pair takes about 0.1 s, within one phase.

    The order alternates, A B B A: after a block where the variant ran first, the
    reference at once also runs the batches of the variant's next block (as many as
    this block had; at the end of an epoch, the next epoch's first ones), before the
    variant does; that next block is paired with it. Order matters here: the side
    that runs right after the other's block pays a switching cost on its first step
    (measured on the MLP: 5.2 ms for the first step after the other model's block,
    4.5 ms in steady state, both sides alike; most likely caches refilled with the
    other model's weights), and of two blocks run back to back the second is about 2%
    slower. `paired_estimate` cancels both. Paired times are compared per micro-batch
    (a block may hold more or fewer micro-batches than the reference ran ahead). The
    epoch's last block is paired at its end. Blocks of warm-up epochs are dropped.

    Args:
        loop: The reference loop (`run_batches(start, stop)` returns its synchronised time; `batches` is the
            epoch), or None: no pairing.
        warmup: Epochs whose blocks are not kept.
        block: About how many micro-batches a block holds (`block_ends`).
        chunk: Micro-batches per host call of the variant (a block holds whole ones).
    """

    def __init__(self, loop=None, warmup: int = 0, block: int = PAIR_BLOCK, chunk: int = 1):
        self.loop = loop
        self.warmup = warmup
        # Where the blocks of an epoch end (micro-batches done): equal blocks of whole chunks.
        self.ends = block_ends(len(loop.batches), chunk, block) if loop is not None else []
        # [variant seconds, reference seconds scaled to the variant's micro-batches, micro-batches, variant ran first]
        self.pairs: List[list] = []
        self._epoch = -1
        self._first = 0  # the open block's first micro-batch, in the epoch
        self._start = 0.0
        self._ahead: Optional[tuple] = None  # (seconds, micro-batches) the reference ran before the open block
        self._ahead_next_epoch = 0  # micro-batches the reference runs ahead when the next epoch starts

    def epoch_start(self) -> None:
        """Call at the start of each epoch of the variant."""
        self._epoch += 1
        self._first = 0
        self._ahead = None
        if self._ahead_next_epoch:  # the B A half of an A B B A that spans an epoch's end
            count = min(self._ahead_next_epoch, len(self.loop.batches))
            self._ahead, self._ahead_next_epoch = (self.loop.run_batches(0, count), count), 0
        self._start = time.perf_counter()

    def due(self, done: int) -> bool:
        """Whether a block ends once the variant has trained `done` micro-batches of this epoch."""
        return self.loop is not None and any(self._first < end <= done for end in self.ends)

    def trained(self, done: int, sync: Callable[[], None], epoch_end: bool = False) -> None:
        """Call when the variant has trained `done` micro-batches of this epoch (after a step or chunk).

        Args:
            done: Micro-batches of this epoch trained so far.
            sync: Waits for the variant's queued work (reads a parameter to the host).
            epoch_end: Pair whatever is left of the epoch, however short.
        """
        count = done - self._first
        if self.loop is None or count <= 0 or not (epoch_end or self.due(done)):
            return
        sync()
        own = time.perf_counter() - self._start
        variant_first = self._ahead is None
        if variant_first:
            reference, reference_count = self.loop.run_batches(self._first, done), count
        else:
            (reference, reference_count), self._ahead = self._ahead, None
        if self._epoch >= self.warmup:
            self.pairs.append([own, reference * count / reference_count, count, variant_first])
        if variant_first:  # the B A half of A B B A: the reference runs the next block first
            upcoming = min(done + count, len(self.loop.batches))
            if upcoming > done:
                self._ahead = (self.loop.run_batches(done, upcoming), upcoming - done)
            else:
                self._ahead_next_epoch = count
        self._first = done
        self._start = time.perf_counter()


def run_reference(variant: Variant, spec, batches, epochs: int, warmup: int, pairing: Pairing) -> dict:
    """Trains with the hand-written loop (plain or accumulating); returns the measurements."""
    loop = build_reference(variant, spec, batches)
    initial = weights_hash(loop.net)
    times, compiles_after_warmup = [], None
    count = len(loop.batches)
    for epoch in range(warmup + epochs):
        if pairing.loop is None:
            times.append(loop.run_epoch())
        else:  # an A/A check: paired with a second, identical reference loop
            pairing.epoch_start()
            times.append(0.0)
            for start, stop in zip([0] + pairing.ends, pairing.ends):
                times[-1] += loop.run_batches(start, stop)
                pairing.trained(stop, lambda: None, epoch_end=stop == count)
        if epoch == warmup - 1:
            compiles_after_warmup = graphs_compiled()
    return dict(epoch_times=times[warmup:], train_loss=loop.final_loss(), initial_weights=initial,
                compiles_total=graphs_compiled(), compiles_after_warmup=graphs_compiled() - compiles_after_warmup,
                final_loss=loss_on_batch(loop.net, loop.loss_fn, batches[0]), notes="")


def run_model_train(variant: Variant, spec, batches, epochs: int, warmup: int, pairing: Pairing) -> dict:
    """Trains with `mindspore.train.Model.train`; returns the measurements."""
    import lightms
    import mindspore as ms
    import numpy as np
    from mindspore import nn
    from mindspore.train import Callback, Model
    from overhead import first_parameter_to_host

    class EpochTimer(Callback):
        """Times each epoch (ended by a host sync, unpaired) and counts the steps MindSpore reports."""

        def __init__(self, net):
            super().__init__()
            self.net = net
            self.times: List[float] = []
            self.step_ends: List[int] = []
            self.steps: List[int] = []
            self.compiles_after_warmup: Optional[int] = None
            self.last_loss = float("nan")
            self._start = 0.0
            self._step_ends = 0

        def on_train_epoch_begin(self, run_context):
            self._step_ends = 0
            self._start = time.perf_counter()

        def on_train_step_end(self, run_context):
            self._step_ends += 1

        def on_train_epoch_end(self, run_context):
            if pairing.loop is None:  # paired, the blocks are timed: a sync here would only add to the last one
                first_parameter_to_host(self.net)
            self.times.append(time.perf_counter() - self._start)
            args = run_context.original_args()
            self.step_ends.append(self._step_ends)
            self.steps.append(int(args.cur_step_num))
            self.last_loss = float(np.asarray(args.net_outputs.asnumpy()).reshape(-1)[0])
            if len(self.times) == warmup:
                self.compiles_after_warmup = graphs_compiled()

    class BlockPairer(Callback):
        """Hands the steps to `pairing` (after EpochTimer in the callback list)."""

        def __init__(self, net):
            super().__init__()
            self.net = net
            self._done = 0

        def on_train_epoch_begin(self, run_context):
            self._done = 0
            pairing.epoch_start()

        def on_train_step_end(self, run_context):
            self._done += 1
            if pairing.due(self._done):
                pairing.trained(self._done, lambda: first_parameter_to_host(self.net))

        def on_train_epoch_end(self, run_context):
            pairing.trained(self._done, lambda: first_parameter_to_host(self.net), epoch_end=True)

    ms.set_context(mode=ms.GRAPH_MODE if variant.mode == "graph" else ms.PYNATIVE_MODE)
    lightms.seed_everything(SEED)
    net = spec.factory()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = nn.Adam(net.trainable_params(), learning_rate=LEARNING_RATE)
    initial = weights_hash(net)
    inputs = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    dataset = ms.dataset.NumpySlicesDataset({"x": inputs, "y": labels}, shuffle=False)
    dataset = dataset.batch(spec.batch_size, drop_remainder=True)
    timer = EpochTimer(net)
    model = Model(net, loss_fn=loss_fn, optimizer=optimizer)
    model.train(warmup + epochs, dataset, callbacks=[timer, BlockPairer(net)], dataset_sink_mode=variant.sink)
    compiles_total = graphs_compiled()
    steps_per_epoch = [b - a for a, b in zip([0] + timer.steps[:-1], timer.steps)]
    notes = (f"steps per epoch {sorted(set(steps_per_epoch))}, step-end callbacks per epoch "
             f"{sorted(set(timer.step_ends))}")
    return dict(epoch_times=timer.times[warmup:], train_loss=timer.last_loss, initial_weights=initial,
                compiles_total=compiles_total, compiles_after_warmup=compiles_total - timer.compiles_after_warmup,
                final_loss=loss_on_batch(net, loss_fn, batches[0]), notes=notes)


def make_trainer(variant: Variant, epochs: int, root_dir: str, callbacks: list):
    """Builds the Trainer of a lightms variant, as users run it: TensorBoard logger and progress bar on."""
    import lightms

    return lightms.Trainer(max_epochs=epochs, accumulate=variant.accumulate, sink_size=variant.sink,
                           precision=variant.precision, enable_checkpointing=False, logger=True,
                           default_root_dir=root_dir, enable_progress_bar=True, log_every_n_steps=50,
                           num_sanity_val_steps=0, callbacks=callbacks)


def run_lightms(variant: Variant, spec, batches, epochs: int, warmup: int, pairing: Pairing) -> dict:
    """Trains with `lightms.Trainer.fit`; returns the measurements."""
    import lightms
    from lightms.callbacks import Callback
    from overhead import BenchModule, first_parameter_to_host

    class EpochTimer(Callback):
        """Times each training epoch, ended by a host sync (unpaired; a paired worker times blocks)."""

        def __init__(self):
            self.times: List[float] = []
            self.compiles_after_warmup: Optional[int] = None
            self._start = 0.0

        def on_train_epoch_start(self, trainer, module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            if pairing.loop is None:  # paired, the blocks are timed: a sync here would only add to the last one
                first_parameter_to_host(module)
            self.times.append(time.perf_counter() - self._start)
            if len(self.times) == warmup:
                self.compiles_after_warmup = graphs_compiled()

    class BlockPairer(Callback):
        """Hands the chunks to `pairing`; runs after every other callback, the progress bar included."""

        order = 2000

        def __init__(self):
            self._done = 0

        def on_train_epoch_start(self, trainer, module):
            self._done = 0
            pairing.epoch_start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._done = batch_idx + 1  # under sinking, batch_idx is the chunk's last index
            if pairing.due(self._done):  # checked here: the harness's own per-step cost stays tiny
                pairing.trained(self._done, lambda: first_parameter_to_host(module))

        def on_train_epoch_end(self, trainer, module):
            pairing.trained(self._done, lambda: first_parameter_to_host(module), epoch_end=True)

    lightms.seed_everything(SEED)
    module = BenchModule(spec.factory)
    initial = weights_hash(module)
    timer = EpochTimer()
    root_dir = tempfile.mkdtemp(prefix="lightms-run-")
    try:
        trainer, notes = make_trainer(variant, warmup + epochs, root_dir, [timer, BlockPairer()]), ""
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            trainer.fit(module, batches)
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)
    compiles_total = graphs_compiled()
    return dict(epoch_times=timer.times[warmup:], train_loss=float(trainer.callback_metrics["loss"]),
                initial_weights=initial, compiles_total=compiles_total,
                compiles_after_warmup=compiles_total - timer.compiles_after_warmup,
                final_loss=loss_on_batch(module.net, module.loss_fn, batches[0]), notes=notes)


def worker(variant_name: str, model: str, batches_per_epoch: int, epochs: int, warmup: int,
           paired: bool = False) -> int:
    """Runs one variant on one model and prints its measurements as one JSON line.

    A paired worker also runs the variant's reference loop, in blocks alternating with
    the variant's (`Pairing`), and reports the block pairs too; its RSS then counts
    both, so the table takes RSS from unpaired workers only. A reference variant's
    paired worker pairs it with an identical copy of itself (the A/A check).

    A variant that lightms does not offer yet (the Trainer raises TypeError,
    ValueError or NotImplementedError) is reported as not available.

    Args:
        variant_name: e.g. "ref" or "lightms-sink10".
        model: "mlp" or "lenet".
        batches_per_epoch: Micro-batches per epoch.
        epochs: Timed epochs.
        warmup: Untimed epochs before them.
        paired: Also time the reference loop, block by block, in this process.

    Returns:
        The exit status (0 also when the variant is not available).
    """
    sys.path.insert(0, BENCH_DIR)
    from overhead import MODELS, make_batches

    variant = parse_variant(variant_name)
    spec = MODELS[model]
    batches = make_batches(spec, batches_per_epoch, seed=SEED)
    run = {"reference": run_reference, "model": run_model_train, "lightms": run_lightms}[variant.kind]
    result = dict(variant=variant_name, model=model, batches=batches_per_epoch, paired=paired)
    try:
        # The reference is built first, so that the variant is built right after its own seeding, as unpaired.
        reference = build_reference(parse_variant(variant.reference), spec, batches) if paired else None
        pairing = Pairing(reference, warmup, chunk=variant.chunk(batches_per_epoch))
        result.update(run(variant, spec, batches, epochs, warmup, pairing))
        result["pairs"] = pairing.pairs
        result["status"] = "ok"
    except (TypeError, ValueError, NotImplementedError) as error:
        result.update(status="not available", error=f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 - reported in the table
        result.update(status="error", error=f"{type(error).__name__}: {error}")
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---- parent: running the rounds --------------------------------------------------------------------

def run_worker(variant: str, model: str, batches: int, epochs: int, warmup: int, scratch: str,
               timeout: float, paired: bool = False) -> dict:
    """Runs one worker subprocess and returns its JSON result (or an error record)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--model", model,
               "--batches", str(batches), "--epochs", str(epochs), "--warmup", str(warmup)]
    if paired:
        command.append("--paired")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(variant=variant, model=model, status="error", error=f"worker timed out after {timeout:.0f} s")
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return dict(variant=variant, model=model, status="error",
                    error=f"worker exited with {done.returncode}: {' | '.join(tail)}", wall=wall)
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall"] = wall
    return result


@dataclass
class Row:
    """One variant of one model, aggregated over rounds."""

    variant: Variant
    runs: List[dict]
    paired_runs: List[dict] = field(default_factory=list)

    @property
    def ok_runs(self) -> List[dict]:
        """The rounds in which the worker succeeded."""
        return [r for r in self.runs if r.get("status") == "ok"]

    @property
    def available(self) -> bool:
        """Whether at least one round succeeded."""
        return bool(self.ok_runs)

    @property
    def problem(self) -> str:
        """The first error of a row without a successful run."""
        failed = next((r for r in self.runs if r.get("status") != "ok"), {})
        return f"{failed.get('status', 'error')}: {failed.get('error', '?')}"

    def step_times(self) -> List[float]:
        """Per round: the median timed epoch over the batches per epoch, in seconds."""
        return [statistics.median(r["epoch_times"]) / r["batches"] for r in self.ok_runs]

    @property
    def step(self) -> float:
        """Median over rounds of the time per micro-batch, in seconds."""
        return statistics.median(self.step_times())

    def paired_ratios(self) -> List[float]:
        """Per block pair of every paired round: the variant's time per micro-batch over the reference's."""
        return [pair[0] / pair[1] for pair in self.pairs()]

    def pairs(self) -> List[list]:
        """The block pairs of every paired round (see `Pairing.pairs`)."""
        return [pair for run in self.paired_runs if run.get("status") == "ok" for pair in run["pairs"]]

    @property
    def paired_ratio(self) -> Optional[float]:
        """`paired_estimate` of all paired rounds: the time ratio to the reference the targets are judged on."""
        return paired_estimate(self.pairs())

    def ratio_to(self, reference: "Row") -> float:
        """Time ratio to the reference, the one targets are judged on.

        Paired and divided by the reference's A/A ratio when both were measured: the A/A
        row is the same method reading two identical loops, so it shows what the method
        reads for no difference (on the MLP here about 0.97: the measured side of a pair
        came out about 3% faster than an identical reference, whichever copy it was).
        Paired alone without an A/A row; across separate processes without pairing.
        """
        if self.paired_ratio is None:
            return self.step / reference.step
        if reference.paired_ratio is None or reference is self:
            return self.paired_ratio
        return self.paired_ratio / reference.paired_ratio

    @property
    def rss(self) -> float:
        """Median over rounds of the peak RSS, in MiB."""
        return statistics.median(r["peak_rss_mib"] for r in self.ok_runs)

    @property
    def final_loss(self) -> float:
        """Loss of the trained weights on the first batch (first successful round)."""
        return self.ok_runs[0]["final_loss"]

    @property
    def train_loss(self) -> float:
        """Loss of the last training step (first successful round)."""
        return self.ok_runs[0]["train_loss"]


def has_time_target(variant: Variant) -> bool:
    """Whether a row's time is judged (lightms at 32 bits), or it is an A/A row (a reference)."""
    return variant.kind == "reference" or (variant.kind == "lightms" and variant.precision == "32")


def check_row(row: Row, rows: Dict[str, Row]) -> List[tuple]:
    """Returns the targets that apply to a row.

    Only lightms rows have targets; the references and `Model.train` are the
    baselines (their loss agreement and compile counts are still shown).

    Args:
        row: The row to judge.
        rows: All rows of the model, by variant name.

    Returns:
        (description, passed) pairs; passed is None when it cannot be judged.
    """
    variant = row.variant
    if variant.kind != "lightms":
        return []
    reference = rows.get(variant.reference)
    have_reference = reference is not None and reference.available
    checks = []
    if have_reference:
        ratio = row.ratio_to(reference)
        if variant.accumulate > 1:
            checks.append((f"time <= {ACCUMULATE_TARGET:.2f}x {variant.reference}", ratio <= ACCUMULATE_TARGET))
        elif variant.precision != "32":
            pass  # no time target: float16 is not faster on the CPU backend
        elif variant.sinks:
            checks.append((f"time <= {SINKING_TARGET:.2f}x ref", ratio <= SINKING_TARGET))
        else:
            checks.append((f"time <= {SINK1_TARGET:.2f}x ref", ratio <= SINK1_TARGET))
        if variant.sinks and variant.accumulate == 1 and variant.precision == "32":
            for mode in ("graph", "pynative"):
                model_rows = [r for r in rows.values()
                              if r.variant.kind == "model" and r.variant.mode == mode and r.available]
                if model_rows:
                    fastest = min(model_rows, key=lambda r: r.ratio_to(reference))
                    checks.append((f"faster than {fastest.variant.name}",
                                   ratio < fastest.ratio_to(reference)))
        checks.append((f"RSS <= {RSS_TARGET:.2f}x {variant.reference}", row.rss <= RSS_TARGET * reference.rss))
    if have_reference and variant.same_maths:
        checks.append(("loss agrees", abs(row.final_loss - reference.final_loss) <= LOSS_TOLERANCE))
    compiles = max(r["compiles_after_warmup"] for r in row.ok_runs)
    checks.append(("0 compiles after warm-up", compiles == 0 if compiles >= 0 else None))
    return checks


def format_table(model: str, rows: Dict[str, Row]) -> List[str]:
    """Returns the markdown table of one model and the notes under it."""
    lines = [f"### {MODEL_TITLES.get(model, model)}", "",
             "| variant | ms per micro-batch | time ratio, judged (paired / A/A) | time ratio, paired | "
             "time ratio, separate processes | reference | peak RSS MiB | RSS ratio | final loss | loss agrees | "
             "compiles (total / after warm-up) | targets | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, row in rows.items():
        variant = row.variant
        if not row.available:
            lines.append(f"| {name} | {row.problem} | | | | | | | | | | | |")
            continue
        reference = rows.get(variant.reference)
        comparable = reference is not None and reference.available and variant.kind != "reference"
        ratio = f"{row.step / reference.step:.3f}" if comparable else "-"
        paired = f"{row.paired_ratio:.3f}" if comparable and row.paired_ratio is not None else "-"
        judged = f"{row.ratio_to(reference):.3f}" if comparable else "-"
        if comparable and row.paired_ratio is not None and reference.paired_ratio is None:
            judged += " (paired: no A/A to divide by)"
        if variant.kind == "reference" and row.paired_ratio is not None:
            paired = f"{row.paired_ratio:.3f} (A/A: against an identical copy)"
        rss_ratio = f"{row.rss / reference.rss:.3f}" if comparable else "-"
        if not comparable:
            agrees = "-"
        elif not variant.same_maths:
            agrees = "n/a (other maths)"
        else:
            agrees = "yes" if abs(row.final_loss - reference.final_loss) <= LOSS_TOLERANCE else (
                f"NO (diff {abs(row.final_loss - reference.final_loss):.2g}"
                f"{'; PyNative kernels' if variant.mode == 'pynative' else ''})")
        compiles = (f"{max(r['compiles_total'] for r in row.ok_runs)} / "
                    f"{max(r['compiles_after_warmup'] for r in row.ok_runs)}")
        checks = check_row(row, rows)
        targets = "; ".join(description for description, _ in checks) or "-"
        failed = [description for description, passed in checks if passed is False]
        verdict = "-" if not checks else "PASS" if not failed else "FAIL: " + "; ".join(failed)
        lines.append(f"| {name} | {row.step * 1e3:.2f} | {judged} | {paired} | {ratio} | "
                     f"{variant.reference if comparable else '-'} | {row.rss:.0f} | {rss_ratio} | {row.final_loss:.6f} | {agrees} | {compiles} | "
                     f"{targets} | {verdict} |")
        times = row.step_times()
        hashes = {r["initial_weights"] for r in row.ok_runs}
        detail = (f"- {name}: {len(row.ok_runs)} round(s); ms per micro-batch by round "
                  f"{', '.join(f'{t * 1e3:.2f}' for t in times)}; last training step's loss {row.train_loss:.6f}; "
                  f"initial weights {', '.join(sorted(hashes))}")
        ratios = row.paired_ratios()
        if ratios:
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            detail += (f"; paired ratio over {len(ratios)} block pairs: quartiles {quartiles[0]:.3f} / "
                       f"{quartiles[1]:.3f} / {quartiles[2]:.3f}")
            medians = order_medians(row.pairs())
            if medians is not None:
                detail += f" (median {medians[0]:.3f} when it ran first, {medians[1]:.3f} when second)"
        extra = row.ok_runs[0].get("notes")
        if extra:
            detail += f"; {extra}"
        if len({r['final_loss'] for r in row.ok_runs}) > 1:
            detail += "; WARNING: final loss differs between rounds"
        if len(row.ok_runs) < len(row.runs):
            detail += f"; {len(row.runs) - len(row.ok_runs)} round(s) failed ({row.problem})"
        notes.append(detail)
    all_hashes = {r["initial_weights"] for row in rows.values() for r in row.ok_runs}
    lines.append("")
    if len(all_hashes) > 1:
        lines.append(f"WARNING: initial weights differ between variants: {sorted(all_hashes)}")
        lines.append("")
    lines += notes
    return lines


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line describing the machine, the versions and the load now."""
    from importlib import metadata

    try:
        mindspore_version = metadata.version("mindspore")
    except metadata.PackageNotFoundError:
        mindspore_version = "?"
    load = os.getloadavg()
    return (f"{cpu_model()}, {os.cpu_count()} cores, MindSpore {mindspore_version}, Python "
            f"{platform.python_version()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet", help="comma-separated: mlp, lenet (default both)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated names or shell patterns, e.g. 'ref,ms-graph-*,lightms-sink1' "
                             "(default all; the references needed are added)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny epochs, one round")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"micro-batches per epoch (default {BATCHES}; {QUICK_BATCHES} with --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"timed epochs (default {TIMED_EPOCHS}; {QUICK_TIMED_EPOCHS} with --quick)")
    parser.add_argument("--paired-epochs", type=int, default=None,
                        help=f"timed epochs of the paired workers of rows with a time target and of the A/A rows "
                             f"(default: {PAIRED_EPOCHS} or --epochs, whichever is more; --epochs with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up epochs (default 1)")
    parser.add_argument("--sink-sizes", default=",".join(map(str, SINK_SIZES)),
                        help="lightms sink sizes (default %(default)s)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="lightms precisions (default %(default)s)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker (default %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in args.models:
        if model not in BATCHES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(BATCHES)}")
    sinks = [s.strip() for s in args.sink_sizes.split(",") if s.strip()]
    sinks = [s if s == "epoch" else int(s) for s in sinks]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        args.variant_names = select_variants(args.variants, default_variants(sinks, precisions))
    except ValueError as error:
        parser.error(str(error))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.epochs = args.epochs or (QUICK_TIMED_EPOCHS if args.quick else TIMED_EPOCHS)
    args.paired_epochs = args.paired_epochs or (args.epochs if args.quick else max(PAIRED_EPOCHS, args.epochs))
    if min(args.repeats, args.epochs, args.paired_epochs, args.warmup) < 1 or (args.batches is not None and args.batches < 1):
        parser.error("--repeats, --epochs, --paired-epochs, --warmup and --batches must be at least 1")
    return args


def summarize(result: dict, batches: int) -> str:
    """One progress line's worth of a worker's result."""
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('error', '')[:120]}"
    own = statistics.median(result["epoch_times"]) / batches * 1e3
    if result.get("paired"):
        estimate = paired_estimate(result["pairs"])
        return f"paired: {len(result['pairs'])} blocks, ratio to its reference {estimate or float('nan'):.3f}"
    return f"{own:.2f} ms/micro-batch, {result['peak_rss_mib']:.0f} MiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the rounds (or, with --worker, one variant) and prints the tables. Returns the exit status."""
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.batches, args.epochs, args.warmup, args.paired)
    start = time.perf_counter()
    machine_before = machine_line()
    print(machine_before, flush=True)
    runs: Dict[tuple, List[dict]] = {}
    scratch = tempfile.mkdtemp(prefix="lightms-bench-")
    try:
        for round_index in range(args.repeats):
            order = args.variant_names if round_index % 2 == 0 else args.variant_names[::-1]
            for model in args.models:
                batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)[model]
                for variant in order:
                    # A reference row's paired worker pairs it with an identical copy of itself (an A/A check).
                    paired_too = parse_variant(variant).kind != "reference" or parse_variant(variant).reference == variant
                    pairings = [False, True] if paired_too else [False]
                    for paired in pairings:
                        epochs = args.paired_epochs if paired and has_time_target(parse_variant(variant)) \
                            else args.epochs
                        result = run_worker(variant, model, batches, epochs, args.warmup, scratch,
                                            args.timeout, paired)
                        runs.setdefault((model, variant, paired), []).append(result)
                        print(f"round {round_index + 1}/{args.repeats} {model:<5} {variant:<26} "
                              f"{summarize(result, batches)} ({result.get('wall', 0):.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    out = ["", f"Machine: {machine_before}", ""]
    out.append(f"{args.repeats} round(s); per worker {args.warmup} warm-up + {args.epochs} timed epoch(s) "
               f"({args.paired_epochs} in the paired workers of rows with a time target and of the A/A rows); "
               f"medians over epochs, then over rounds; paired ratios: crossover estimate over all block pairs of all "
               f"rounds (`paired_estimate`), judged after division by the reference's A/A ratio.")
    for model in args.models:
        rows = {name: Row(parse_variant(name), runs[(model, name, False)], runs.get((model, name, True), []))
                for name in args.variant_names}
        out += [""] + format_table(model, rows)
    out += ["", f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                f"total {time.perf_counter() - start:.0f} s"]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text.lstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
