"""Measures what `lightms.Trainer.fit` costs per micro-batch over hand-written MindSpore loops.

Two comparisons are made, side by side in one run, for an MLP 784-512-512-10
(batch 128) and a LeNet-5 (1x32x32 input, 10 classes, batch 64), both trained
with `nn.Adam(learning_rate=1e-3)` and `nn.CrossEntropyLoss` on synthetic,
seeded data (numpy `default_rng`, float32 inputs, int32 labels):

* compiled: `Trainer(compile=True).fit` against a hand-written train step
  (`mindspore.value_and_grad` + optimizer, joined with `ops.depend`) compiled
  as a whole-graph Cell (`Cell.compile_and_run`, what calling a Cell does in
  GRAPH_MODE: MindSpore's fastest per-call path on this CPU, 2-4x faster than a
  `mindspore.jit` function);
* eager: `Trainer(compile=False).fit` against the same hand-written step run
  in PyNative, without `jit`.

The Trainer runs as users run it: TensorBoard logger and progress bar on,
`log_every_n_steps=50`, no validation data, the loss logged with
`self.log("loss", loss)` in `training_step`. The numpy batches go to `fit` as a
Python list; the reference loop gets the same batches, converted to Tensors once.

How the time is taken:

* Both models start from the same weights (`lightms.seed_everything(0)` before
  each is built; the script checks that the weights are equal) and see the same
  batches in the same order, so their final training losses must agree.
* Reference and lightms epochs are interleaved, so that both see the same
  background load: a `lightms.callbacks.Callback` runs one reference epoch at the
  start of every lightms epoch, then starts the lightms clock; at the end of the
  lightms epoch it synchronises by reading one parameter of the module to the
  host and stops the clock. Every reference epoch ends with the same sync.
* The first epoch of each (compilation, first-call costs) is a warm-up and is
  not timed. The reported time per step is the median epoch time divided by the
  batches per epoch; the ratio is lightms's over the reference's. Under the
  table, each row's notes give the spread, the median of the per-epoch ratios
  (lightms epoch k over reference epoch k, which cancels slow drifts in the
  machine's load), and what the Trainer does between two epochs (epoch metrics,
  logger writes, closing the progress bar), which falls outside the timed span.
* `lightms.compiled_graph_count()` is recorded after the first epoch and at the
  end; graphs compiled in between are recompilations (the reference's are
  counted separately).

Run it from the repository root:

    python benchmarks/overhead.py                  # full run, a few minutes on 2 cores
    python benchmarks/overhead.py --quick          # smoke run
    python benchmarks/overhead.py --models mlp --modes compiled

The progress bar is drawn to /dev/null so that it does not garble the table
(pass `--show-progress` to see it). `ONEDNN_MAX_CPU_ISA=AVX2` and `GLOG_v=3` are
set before MindSpore is imported unless already set: without the first,
oneDNN picks a reference-speed convolution on AVX-512 CPUs.
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before MindSpore runs a conv kernel: fast convolutions
os.environ.setdefault("GLOG_v", "3")  # before MindSpore is imported: no routine warnings

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

try:
    import lightms  # noqa: E402
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lightms  # noqa: E402

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from lightms.callbacks import Callback  # noqa: E402

COMPILED_TARGET = 1.10  # compiled fit at most 1.10x the hand-written graph step
EAGER_TARGET = 1.20  # eager fit at most 1.2x the hand-written PyNative loop
LEARNING_RATE = 1e-3
SEED = 0


# ---- models and data ---------------------------------------------------------------------

def make_mlp() -> nn.Cell:
    """Returns an MLP 784-512-512-10 with ReLU activations."""
    return nn.SequentialCell(
        nn.Dense(784, 512), nn.ReLU(),
        nn.Dense(512, 512), nn.ReLU(),
        nn.Dense(512, 10),
    )


def make_lenet() -> nn.Cell:
    """Returns LeNet-5 for 1x32x32 inputs and 10 classes."""
    return nn.SequentialCell(
        nn.Conv2d(1, 6, 5, pad_mode="valid"), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, 5, pad_mode="valid"), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Dense(16 * 5 * 5, 120), nn.ReLU(),
        nn.Dense(120, 84), nn.ReLU(),
        nn.Dense(84, 10),
    )


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    Attributes:
        name: Short name used on the command line and in the table.
        factory: Builds the network (call after seeding).
        sample_shape: Shape of one input sample.
        batch_size: Samples per batch.
    """

    name: str
    factory: Callable[[], nn.Cell]
    sample_shape: Tuple[int, ...]
    batch_size: int


MODELS: Dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", make_mlp, (784,), 128),
    "lenet": ModelSpec("lenet", make_lenet, (1, 32, 32), 64),
}


def make_batches(spec: ModelSpec, count: int, seed: int = SEED) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Returns `count` seeded (inputs float32, labels int32) numpy batches for `spec`."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.standard_normal((spec.batch_size, *spec.sample_shape)).astype(np.float32)
        y = rng.integers(0, 10, size=spec.batch_size).astype(np.int32)
        batches.append((x, y))
    return batches


class BenchModule(lightms.LightningCell):
    """The lightms side: a network, cross-entropy, Adam, and the loss logged each step.

    Args:
        factory: Builds the network.
    """

    def __init__(self, factory: Callable[[], nn.Cell]):
        super().__init__()
        self.net = factory()
        self.loss_fn = nn.CrossEntropyLoss()

    def construct(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return nn.Adam(self.trainable_params(), learning_rate=LEARNING_RATE)


def first_parameter_to_host(cell: nn.Cell) -> np.ndarray:
    """Reads one parameter of `cell` to the host: waits for the steps queued before it."""
    return next(iter(cell.get_parameters())).asnumpy()


def parameter_arrays(cell: nn.Cell) -> List[np.ndarray]:
    """Returns the trainable parameters of `cell` as numpy arrays, in order."""
    return [p.asnumpy() for p in cell.trainable_params()]


# ---- the hand-written reference ------------------------------------------------------------

class ReferenceLoop:
    """A hand-written MindSpore training loop: value_and_grad + optimizer, optionally compiled.

    Args:
        spec: The model to build (seed before constructing this).
        batches: The numpy batches of one epoch; converted to Tensors once.
        compile: Run the step as a whole-graph Cell (True) or in PyNative.
        use_jit: Compile it as a `mindspore.jit(jit_level="O1")` function instead of a Cell.
    """

    def __init__(self, spec: ModelSpec, batches: Sequence[Tuple[np.ndarray, np.ndarray]], compile: bool,
                 use_jit: bool = False):
        self.net = spec.factory()
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = nn.Adam(self.net.trainable_params(), learning_rate=LEARNING_RATE)
        self.batches = [(Tensor(x), Tensor(y)) for x, y in batches]
        net, loss_fn, optimizer = self.net, self.loss_fn, self.optimizer

        def forward(x, y):
            return loss_fn(net(x), y)

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

        def train_step(x, y):
            loss, grads = grad_fn(x, y)
            return ops.depend(loss, optimizer(grads))

        # Separate Tensor arguments are variable inputs: no ms.mutable needed, no recompilation.
        class Step(nn.Cell):
            def construct(self, x, y):
                return train_step(x, y)

        if use_jit:
            self.step = ms.jit(train_step, jit_level="O1")
        else:
            self.step = Step().compile_and_run if compile else train_step
        self.last_loss: Optional[Tensor] = None

    def run_epoch(self) -> float:
        """Trains one epoch over the batches; returns its duration in seconds, synchronised."""
        return self.run_batches(0, len(self.batches))

    def run_batches(self, start: int, stop: int) -> float:
        """Trains on batches [start, stop) of the epoch; returns the duration in seconds, synchronised."""
        begin = time.perf_counter()
        loss = None
        for x, y in self.batches[start:stop]:
            loss = self.step(x, y)
        first_parameter_to_host(self.net)
        elapsed = time.perf_counter() - begin
        self.last_loss = loss
        return elapsed

    def final_loss(self) -> float:
        """The loss of the last step taken."""
        return float(self.last_loss.asnumpy())


# ---- timing lightms from a callback, interleaved with the reference -----------------------------

class InterleavedTimer(Callback):
    """Times each lightms training epoch and runs one reference epoch before it.

    At each epoch start: one reference epoch (timed by itself), then the lightms clock
    starts. At each epoch end: one parameter is read to the host, then the clock stops.
    The time from an epoch's end to the next epoch's start (the Trainer's epoch-end
    work) is recorded separately.

    Args:
        reference: The hand-written loop to interleave.
    """

    def __init__(self, reference: ReferenceLoop):
        self.reference = reference
        self.ref_times: List[float] = []
        self.lightms_times: List[float] = []
        self.between_epochs: List[float] = []  # after epoch k, k = 0, 1, ...
        self.ref_graphs: List[int] = []  # graphs compiled during each reference epoch
        self.graphs_after_first_epoch: Optional[int] = None
        self._start = 0.0
        self._last_end: Optional[float] = None

    def on_train_epoch_start(self, trainer, module):
        entry = time.perf_counter()
        if self._last_end is not None:
            self.between_epochs.append(entry - self._last_end)
        before = lightms.compiled_graph_count()
        self.ref_times.append(self.reference.run_epoch())
        self.ref_graphs.append(lightms.compiled_graph_count() - before)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        first_parameter_to_host(module)
        end = time.perf_counter()
        self.lightms_times.append(end - self._start)
        self._last_end = end
        if self.graphs_after_first_epoch is None:
            self.graphs_after_first_epoch = lightms.compiled_graph_count()


# ---- one comparison ---------------------------------------------------------------------------

@dataclass
class Result:
    """What one (model, mode) comparison measured; times in seconds per micro-batch."""

    model: str
    mode: str
    batches: int
    timed_epochs: int
    ref_step: float
    lightms_step: float
    ref_spread: Tuple[float, float]
    lightms_spread: Tuple[float, float]
    paired_ratio: float
    between_epochs_step: float
    ref_loss: float
    lightms_loss: float
    lightms_recompiles: int
    ref_recompiles: int
    graphs_after_first_epoch: int
    graphs_at_end: int
    same_initial_weights: bool
    wall: float

    @property
    def ratio(self) -> float:
        return self.lightms_step / self.ref_step

    @property
    def target(self) -> float:
        return COMPILED_TARGET if self.mode == "compiled" else EAGER_TARGET


def compare(spec: ModelSpec, compile: bool, batches_per_epoch: int, warmup_epochs: int, timed_epochs: int,
            root_dir: str, show_progress: bool) -> Result:
    """Trains `spec` with the reference loop and with `Trainer.fit`, interleaved, and times both.

    Args:
        spec: The model.
        compile: Compiled (True) or eager (False) for both sides.
        batches_per_epoch: Micro-batches per epoch.
        warmup_epochs: Leading epochs left out of the timing.
        timed_epochs: Epochs timed after the warm-up.
        root_dir: A scratch folder for the Trainer's logs.
        show_progress: Draw the progress bar to stdout instead of /dev/null.

    Returns:
        The measurements.
    """
    wall_start = time.perf_counter()
    batches = make_batches(spec, batches_per_epoch)

    lightms.seed_everything(SEED)
    reference = ReferenceLoop(spec, batches, compile)
    lightms.seed_everything(SEED)
    module = BenchModule(spec.factory)
    ref_init, lms_init = parameter_arrays(reference.net), parameter_arrays(module)
    same_init = len(ref_init) == len(lms_init) and all(np.array_equal(a, b) for a, b in zip(ref_init, lms_init))

    epochs = warmup_epochs + timed_epochs
    timer = InterleavedTimer(reference)
    trainer = lightms.Trainer(
        max_epochs=epochs, compile=compile, logger=True, enable_progress_bar=True,
        default_root_dir=os.path.join(root_dir, f"{spec.name}-{'compiled' if compile else 'eager'}"),
        num_sanity_val_steps=0, log_every_n_steps=50, callbacks=[timer],
    )
    with open(os.devnull, "w") as devnull:
        redirect = contextlib.nullcontext() if show_progress else contextlib.redirect_stdout(devnull)
        with redirect:
            trainer.fit(module, batches)
    lightms_loss = float(trainer.callback_metrics["loss"])
    graphs_at_end = lightms.compiled_graph_count()

    total_recompiles = graphs_at_end - timer.graphs_after_first_epoch
    ref_recompiles = sum(timer.ref_graphs[1:])  # reference epochs after the first run inside that span
    ref_times = [t / batches_per_epoch for t in timer.ref_times[warmup_epochs:]]
    lms_times = [t / batches_per_epoch for t in timer.lightms_times[warmup_epochs:]]
    between = [t / batches_per_epoch for t in timer.between_epochs[warmup_epochs:]]
    return Result(
        model=spec.name,
        mode="compiled" if compile else "eager",
        batches=batches_per_epoch,
        timed_epochs=timed_epochs,
        ref_step=statistics.median(ref_times),
        lightms_step=statistics.median(lms_times),
        ref_spread=(min(ref_times), max(ref_times)),
        lightms_spread=(min(lms_times), max(lms_times)),
        paired_ratio=statistics.median(lms / ref for lms, ref in zip(lms_times, ref_times)),
        between_epochs_step=statistics.median(between) if between else float("nan"),
        ref_loss=reference.final_loss(),
        lightms_loss=lightms_loss,
        lightms_recompiles=total_recompiles - ref_recompiles,
        ref_recompiles=ref_recompiles,
        graphs_after_first_epoch=timer.graphs_after_first_epoch,
        graphs_at_end=graphs_at_end,
        same_initial_weights=same_init,
        wall=time.perf_counter() - wall_start,
    )


# ---- reporting ----------------------------------------------------------------------------------

def losses_agree(a: float, b: float, rtol: float = 1e-4) -> bool:
    """Whether two final losses agree to `rtol` (relative)."""
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def print_table(results: List[Result]) -> None:
    """Prints the comparison table and the notes under it."""
    header = (f"{'model':<6} {'mode':<9} {'ref ms/step':>11} {'lightms ms/step':>15} {'ratio':>6} {'target':>7} "
              f"{'':<5} {'ref final loss':>14} {'lightms final loss':>18} {'recompiles after ep1':>20}")
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "ok" if r.ratio <= r.target else "ABOVE"
        print(f"{r.model:<6} {r.mode:<9} {r.ref_step * 1e3:>11.2f} {r.lightms_step * 1e3:>15.2f} "
              f"{r.ratio:>6.3f} {'<=' + format(r.target, '.2f'):>7} {verdict:<5} {r.ref_loss:>14.6f} "
              f"{r.lightms_loss:>18.6f} {r.lightms_recompiles:>20d}")
    print()
    for r in results:
        print(f"{r.model}/{r.mode}: {r.timed_epochs} timed epochs of {r.batches} batches (after warm-up); "
              f"per-step min-max ref {r.ref_spread[0] * 1e3:.2f}-{r.ref_spread[1] * 1e3:.2f} ms, "
              f"lightms {r.lightms_spread[0] * 1e3:.2f}-{r.lightms_spread[1] * 1e3:.2f} ms")
        print(f"  median of per-epoch ratios (lightms epoch k / reference epoch k) {r.paired_ratio:.3f}; "
              f"Trainer work between epochs {r.between_epochs_step * 1e3:.3f} ms/step "
              f"(ratio {((r.lightms_step + r.between_epochs_step) / r.ref_step):.3f} with it)")
        print(f"  compiled graphs in the process: {r.graphs_after_first_epoch} after epoch 1, {r.graphs_at_end} at "
              f"the end (lightms {r.lightms_recompiles}, reference {r.ref_recompiles}); {r.wall:.0f} s wall")
        problems = []
        if not r.same_initial_weights:
            problems.append("initial weights differ between reference and lightms")
        if not losses_agree(r.ref_loss, r.lightms_loss):
            problems.append(f"final losses disagree (|diff| {abs(r.ref_loss - r.lightms_loss):.3g})")
        if r.lightms_recompiles:
            problems.append(f"lightms compiled {r.lightms_recompiles} graph(s) after epoch 1")
        if r.ref_recompiles:
            problems.append(f"the reference compiled {r.ref_recompiles} graph(s) after epoch 1")
        for problem in problems:
            print(f"  WARNING {r.model}/{r.mode}: {problem}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet", help="comma-separated: mlp, lenet (default both)")
    parser.add_argument("--modes", default="compiled,eager", help="comma-separated: compiled, eager (default both)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (few batches and epochs)")
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch, compiled (default 30)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs, compiled (default 24)")
    parser.add_argument("--eager-batches", type=int, default=None, help="batches per epoch, eager (default 12)")
    parser.add_argument("--eager-epochs", type=int, default=None, help="timed epochs, eager (default 12)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs, not timed (default 1)")
    parser.add_argument("--show-progress", action="store_true", help="draw the progress bar on stdout")
    args = parser.parse_args(argv)
    quick = args.quick
    args.batches = args.batches or (8 if quick else 30)
    args.epochs = args.epochs or (2 if quick else 24)
    args.eager_batches = args.eager_batches or (4 if quick else 12)
    args.eager_epochs = args.eager_epochs or (2 if quick else 12)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    args.modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for mode in args.modes:
        if mode not in ("compiled", "eager"):
            parser.error(f"unknown mode {mode!r}; choose from compiled, eager")
    for option in ("batches", "epochs", "eager_batches", "eager_epochs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first epoch compiles)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the comparisons and prints the table. Returns the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"lightms {lightms.__version__}, MindSpore {ms.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f}; "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}")
    root_dir = tempfile.mkdtemp(prefix="lightms-overhead-")
    results = []
    try:
        for name in args.models:
            for mode in args.modes:
                compile = mode == "compiled"
                batches = args.batches if compile else args.eager_batches
                epochs = args.epochs if compile else args.eager_epochs
                print(f"running {name}/{mode}: {args.warmup} warm-up + {epochs} timed epochs of {batches} "
                      f"batches ...", flush=True)
                results.append(compare(MODELS[name], compile, batches, args.warmup, epochs, root_dir,
                                       args.show_progress))
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)
    print()
    print_table(results)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
