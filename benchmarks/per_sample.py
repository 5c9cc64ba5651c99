"""Times `lightms.autodiff.per_sample_grads` (vmap) against a Python loop of single-example gradients.

One MLP (128-256-10, tanh, cross-entropy on one example: 35,594 weights), batch sizes 16, 64
and 256, these ways of getting every example's gradient, side by side in one run:

* `vmap`: `per_sample_grads` called inside a compiled whole-graph Cell
  (`lightms.engine.engine.compile_function`), the way a lightms training step calls it;
* `vmap-direct`: the function `per_sample_grads` returns, called from Python (its own
  `mindspore.jit` graph, run through the PyNative executor);
* `loop-compiled`: the single-example gradient compiled as a whole-graph Cell, called
  once per example in a Python loop, then the per-example gradients stacked
  (`ops.stack`, eager) into the same batched Tensors;
* `loop-eager`: the same loop with the single-example gradient in PyNative (`mindspore.grad`,
  no compilation), stacked alike.

Every way gets the same weights and the same Tensors (the loops get the examples sliced
beforehand: slicing is not timed). One timed call ends with a host sync (the last
gradient read with `.asnumpy()`); each way is warmed up (compiled) first. Rounds run
every way once per batch size, in reverse order on odd rounds, so that drifts in the
machine's load hit all alike; the table gives the median over rounds and the ratio of
each other way's median to `vmap`'s (higher: vmap is that many times faster). `max diff`
is the largest |difference| between `vmap`'s gradients and any other way's (must be
at most 1e-5; the script exits with status 1 otherwise).

Run it from the repository root:

    python benchmarks/per_sample.py            # full run, about 3 minutes on 2 cores
    python benchmarks/per_sample.py --quick    # smoke run: batch sizes 16 and 64, 2 rounds
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # as the other benchmarks (no convolutions here)
os.environ.setdefault("GLOG_v", "3")  # before MindSpore is imported: no routine warnings

import argparse  # noqa: E402
import datetime  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

try:
    import lightms  # noqa: E402
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lightms  # noqa: E402

import mindspore as ms  # noqa: E402
from mindspore import ParameterTuple, Tensor, nn, ops  # noqa: E402

from lightms.autodiff import per_sample_grads  # noqa: E402
from lightms.engine.engine import compile_function  # noqa: E402

from run import machine_line  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

SIZES = (128, 256, 10)
BATCH_SIZES = (16, 64, 256)
QUICK_BATCH_SIZES = (16, 64)
REPEATS, QUICK_REPEATS = 5, 2
TOLERANCE = 1e-5
WAYS = ("vmap", "vmap-direct", "loop-compiled", "loop-eager")


def build_model():
    """The MLP and its one-example loss, from seed 0."""
    lightms.seed_everything(0)
    net = nn.SequentialCell(nn.Dense(SIZES[0], SIZES[1]), nn.Tanh(), nn.Dense(SIZES[1], SIZES[2]))

    def loss_one(x, label):  # x: [128], label: int32 scalar
        return ops.cross_entropy(net(x.expand_dims(0)), label.expand_dims(0))

    return net, loss_one


def make_ways(net, loss_one) -> Dict[str, Callable]:
    """way name -> function(x, labels, examples) returning the batched per-example gradients."""
    weights = ParameterTuple(net.trainable_params())
    batched = per_sample_grads(loss_one, weights)

    def vmap_step(x, labels):
        return batched(x, labels)

    vmap_graph = compile_function(vmap_step, True)
    single_eager = ms.grad(loss_one, None, weights)

    def single_step(x, label):
        return single_eager(x, label)

    single_graph = compile_function(single_step, True)

    def loop(single):
        def run(x, labels, examples):
            per_example = [single(xi, li) for xi, li in examples]
            # Stacked into the same batched Tensors vmap returns: part of what the loop costs.
            return tuple(ops.stack([grads[k] for grads in per_example]) for k in range(len(weights)))
        return run

    return {
        "vmap": lambda x, labels, examples: vmap_graph(x, labels),
        "vmap-direct": lambda x, labels, examples: batched(x, labels),
        "loop-compiled": loop(single_graph),
        "loop-eager": loop(single_eager),
    }


def timed(way: Callable, x, labels, examples) -> float:
    """Seconds for one call, ending with a host sync."""
    start = time.perf_counter()
    grads = way(x, labels, examples)
    grads[-1].asnumpy()
    return time.perf_counter() - start


def measure(batch_sizes: Sequence[int], repeats: int) -> Dict[int, Dict[str, object]]:
    """Runs the rounds; returns batch size -> {"times": way -> [seconds], "max_diff": float}."""
    net, loss_one = build_model()
    ways = make_ways(net, loss_one)
    rng = np.random.default_rng(0)
    inputs = {}
    results: Dict[int, Dict[str, object]] = {}
    for batch in batch_sizes:
        x = Tensor(rng.standard_normal((batch, SIZES[0])).astype(np.float32))
        labels = Tensor(rng.integers(0, SIZES[2], batch).astype(np.int32))
        examples = [(x[i], labels[i]) for i in range(batch)]
        inputs[batch] = (x, labels, examples)
        outputs = {name: way(x, labels, examples) for name, way in ways.items()}  # warm-up: compiles
        max_diff = max(float(np.abs(a.asnumpy() - b.asnumpy()).max())
                       for name in WAYS[1:] for a, b in zip(outputs["vmap"], outputs[name]))
        results[batch] = {"times": {name: [] for name in WAYS}, "max_diff": max_diff}
    for round_index in range(repeats):
        order = WAYS if round_index % 2 == 0 else WAYS[::-1]
        for batch in batch_sizes:
            for name in order:
                results[batch]["times"][name].append(timed(ways[name], *inputs[batch]))
        print(f"round {round_index + 1}/{repeats} done", flush=True)
    return results


def format_table(results: Dict[int, Dict[str, object]]) -> List[str]:
    """The markdown table: median ms per batch of each way, and each way's ratio to vmap."""
    lines = ["| batch | vmap ms | vmap-direct ms (x vmap) | loop-compiled ms (x vmap) | loop-eager ms (x vmap) "
             "| max diff | agrees |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for batch, result in results.items():
        medians = {name: statistics.median(times) * 1e3 for name, times in result["times"].items()}
        cells = [f"{medians[name]:.2f} ({medians[name] / medians['vmap']:.1f}x)" for name in WAYS[1:]]
        agrees = "yes" if result["max_diff"] <= TOLERANCE else "NO"
        lines.append(f"| {batch} | {medians['vmap']:.2f} | {' | '.join(cells)} | {result['max_diff']:.1e} "
                     f"| {agrees} |")
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: batch sizes {QUICK_BATCH_SIZES}, {QUICK_REPEATS} rounds")
    parser.add_argument("--batch-sizes", default=None,
                        help=f"comma-separated (default {','.join(map(str, BATCH_SIZES))})")
    parser.add_argument("--repeats", type=int, default=None, help=f"rounds (default {REPEATS})")
    args = parser.parse_args(argv)
    if args.batch_sizes:
        args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    else:
        args.batch_sizes = list(QUICK_BATCH_SIZES if args.quick else BATCH_SIZES)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    if args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeats and the batch sizes must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measures and prints the table. Returns the exit status: 1 if a way's gradients disagree with vmap's."""
    args = parse_args(argv)
    start = time.perf_counter()
    machine = machine_line()
    print(machine, flush=True)
    scratch = tempfile.mkdtemp(prefix="lightms-bench-")
    here = os.getcwd()
    os.chdir(scratch)  # MindSpore writes rank_0/ into the working directory when a graph fails to compile
    try:
        results = measure(args.batch_sizes, args.repeats)
    finally:
        os.chdir(here)
        shutil.rmtree(scratch, ignore_errors=True)
    out = ["", f"Date: {datetime.date.today().isoformat()}", f"Machine: {machine}",
           f"MLP {'-'.join(map(str, SIZES))}, per-example cross-entropy; median of {args.repeats} round(s), "
           "ms per batch (all of its examples' gradients); (Nx vmap) = that way's median / vmap's.", ""]
    out += format_table(results)
    out += ["", f"Total {time.perf_counter() - start:.0f} s"]
    print("\n".join(out))
    return 0 if all(result["max_diff"] <= TOLERANCE for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
