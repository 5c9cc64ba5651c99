"""`DPSGD`: differentially private training in the compiled step (Abadi et al., 2016).

`Trainer(plugins=[DPSGD(max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-5)])`
changes what the engine's step computes, not the user's `training_step`:

1. each example's gradient of the training loss (`mindspore.vmap` over
   `mindspore.grad`, with the batch axis kept at size 1 so training_step runs as it is);
2. each clipped to `max_grad_norm` in global L2 norm over all trained parameters;
3. summed over the step's examples (the whole window under `accumulate=k`);
4. Gaussian noise of standard deviation `noise_multiplier * max_grad_norm` added once
   per optimizer step, drawn on the host (numpy's PCG64, its state in the checkpoint);
5. divided by the number of examples, then the optimizer update.

The epsilon spent comes from Google's `dp-accounting` (`lightms.privacy.accounting`),
logged as `epsilon` at each training epoch end.
"""

from typing import Optional

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from lightms.callbacks.callback import Callback
from lightms.privacy.accounting import ACCOUNTANTS, PrivacyAccountant

_hyper_map = ops.HyperMap()


class DPSGD(Callback):
    """DP-SGD: per-example clipping and Gaussian noise in the compiled training step.

    By default the batches are the ones the data gives (shuffled, fixed-size, as most
    libraries ship), and the accountant treats each optimizer step as Poisson-subsampled
    with rate `examples per optimizer step / examples per epoch`.

    Args:
        max_grad_norm: Each example's gradient is scaled to at most this global L2 norm.
        noise_multiplier: The noise's standard deviation over `max_grad_norm` (0: no noise,
            and no privacy: epsilon is infinite).
        delta: The delta the reported epsilon holds for.
        seed: Seeds the noise generator; by default the operating system's entropy (the noise
            must be secret: a known seed lets anyone subtract it). A fixed seed is for tests.
            The generator's state is saved in checkpoints, so a resumed run draws the noise the
            uninterrupted one would have: keep checkpoints as private as the data.
        accountant: "rdp" (Renyi DP, as Opacus and TensorFlow Privacy report) or "pld".
        dataset_size: The training examples per epoch, for data whose size lightms cannot
            count (neither a list of batches nor a batched mindspore.dataset).

    Raises:
        ValueError: For a non-positive `max_grad_norm`, a negative `noise_multiplier`, a delta
            outside (0, 1) or another accountant.
        ImportError: If `dp-accounting` is missing (`pip install "lightms[privacy]"`).
    """

    order = 10  # before the module's hooks: its on_train_epoch_end sees epsilon

    def __init__(self, max_grad_norm: float = 1.0, noise_multiplier: float = 1.1, delta: float = 1e-5,
                 seed: Optional[int] = None, accountant: str = "rdp", dataset_size: Optional[int] = None):
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
            raise ValueError(f"DPSGD(max_grad_norm={max_grad_norm!r}): the clipping norm must be a positive number.")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"DPSGD(accountant={accountant!r}): choose one of {ACCOUNTANTS}.")
        self.max_grad_norm = float(max_grad_norm)
        # Checks noise_multiplier and delta, and that dp-accounting is installed, before any training.
        PrivacyAccountant(noise_multiplier, 0.5, delta, accountant)
        self.noise_multiplier, self.delta, self.accountant = float(noise_multiplier), float(delta), accountant
        # The noise must be secret: by default its seed comes from the operating system's entropy.
        self.seed = int(np.random.SeedSequence().entropy if seed is None else seed)
        if dataset_size is not None and (isinstance(dataset_size, bool) or not isinstance(dataset_size, int)
                                         or dataset_size < 1):
            raise ValueError(f"DPSGD(dataset_size={dataset_size!r}) must be a positive int.")
        self.dataset_size = dataset_size
        self.sampling_rate: Optional[float] = None
        self._trainer = None

    # ---- accounting ------------------------------------------------------------------------------
    def setup(self, trainer, module, stage: str) -> None:
        self._trainer = trainer

    def plan_sampling(self, accumulate: int, batch_size: int, examples: int) -> None:
        """Sets the sampling rate the accountant uses: examples per optimizer step over examples per epoch.

        Args:
            accumulate: Micro-batches per optimizer step.
            batch_size: The largest batch's examples.
            examples: The examples of one epoch (a lower bound errs on the safe side).
        """
        self.sampling_rate = min(1.0, accumulate * batch_size / examples)

    @property
    def steps(self) -> int:
        """Optimizer steps taken with DP-SGD so far (the run's `global_step`)."""
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far for `delta` (0 before training; inf with no noise)."""
        if self.sampling_rate is None or not self.steps:
            return 0.0
        accountant = PrivacyAccountant(self.noise_multiplier, self.sampling_rate, self.delta, self.accountant)
        accountant.step(self.steps)
        return accountant.epsilon

    def on_train_epoch_end(self, trainer, module) -> None:
        module.log("epsilon", self.epsilon, on_step=False, on_epoch=True)

    def __repr__(self) -> str:
        return (f"DPSGD(max_grad_norm={self.max_grad_norm:g}, noise_multiplier={self.noise_multiplier:g}, "
                f"delta={self.delta:g})")


# ---- the step's pieces (graph-parseable) --------------------------------------------------------
def check_splittable(module) -> None:
    """Refuses a module whose loss cannot be split per example (BatchNorm) or vmapped (Dropout).

    Raises:
        ValueError: Naming the BatchNorm cells (their statistics mix the examples of a batch), or the
            Dropout cells.
    """
    mixing = [name or type(module).__name__ for name, cell in module.cells_and_names()
              if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and cell.training]
    if mixing:
        raise ValueError(f"DPSGD needs a loss that is a mean (or sum) of per-example losses, but "
                         f"{type(module).__name__} has BatchNorm in training mode ({', '.join(mixing)}), whose batch "
                         "statistics mix the examples. Replace it by nn.GroupNorm or nn.LayerNorm, or put it in eval "
                         "mode.")
    dropout = [name or type(module).__name__ for name, cell in module.cells_and_names()
               if type(cell).__name__.startswith("Dropout") and cell.training]
    if dropout:
        raise ValueError(f"DPSGD: {type(module).__name__} has Dropout in training mode ({', '.join(dropout)}), which "
                         "MindSpore 2.10 cannot run inside vmap (the per-example gradients fail to compile). Put it "
                         "in eval mode (set_train(False) on it) or remove it.")


def check_per_example_loss(loss_of, batch, where: str, examples: int = 4) -> None:
    """Checks on the first batch that the loss is a mean or a sum of per-example losses.

    Args:
        loss_of: Runs training_step on a batch and returns its loss as a float (logging nothing).
        batch: The first batch (a Tensor or a flat tuple, list or dict of them).
        where: "ClassName.training_step", for the message.
        examples: How many of the batch's examples to compare.

    Raises:
        ValueError: If the loss of the first examples together is neither the mean nor the sum
            of their single-example losses (a loss that mixes examples, or BatchNorm).
    """
    count = min(examples, batch_size(batch))
    together = loss_of(slice_batch(batch, 0, count))
    alone = np.array([loss_of(slice_batch(batch, i, i + 1)) for i in range(count)], dtype=np.float64)
    for reduced in (alone.mean(), alone.sum()):
        if abs(together - reduced) <= 1e-4 * max(1.0, abs(reduced)):
            return
    raise ValueError(f"DPSGD: {where}'s loss on {count} examples is {together:.6g}, but their losses one at a time "
                     f"average {alone.mean():.6g} (sum {alone.sum():.6g}): the loss mixes examples (BatchNorm, a "
                     "contrastive loss, a batch-level normalisation), so per-example gradients would not bound each "
                     "example's influence and the privacy guarantee would not hold.")


def epoch_examples(source, batch_count: Optional[int], first_size: int, dataset_size: Optional[int] = None):
    """(largest batch size, examples per epoch) of a training source, for the sampling rate.

    A Python list or tuple of batches is counted exactly. Given `dataset_size`, the batches are
    taken to be of the first one's size. A `mindspore.dataset` pipeline gives its batch size; its
    last batch may be smaller, so the epoch counts one example in its last batch (a lower bound:
    the sampling rate comes out no smaller than the true one).

    Raises:
        ValueError: For data whose size lightms cannot tell (the accountant needs it).
    """
    data = source.data
    if isinstance(data, (list, tuple)):
        sizes = [batch_size(batch) for batch in data[:batch_count]]
        return max(sizes), sum(sizes)
    if dataset_size is not None:
        return first_size, dataset_size
    get_batch_size = getattr(data, "get_batch_size", None)
    if get_batch_size is not None and batch_count:
        size = int(get_batch_size())
        return size, (batch_count - 1) * size + 1
    raise ValueError(f"DPSGD needs the number of training examples for its privacy accounting, and "
                     f"{type(data).__name__} cannot tell it: pass DPSGD(dataset_size=N), a list of batches or "
                     "a batched mindspore.dataset.")


def _first_leaf(batch):
    if isinstance(batch, dict):
        return _first_leaf(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return _first_leaf(batch[0])
    return batch


def check_flat(batch, where: str) -> None:
    """Refuses a nested batch under DP-SGD (its per-example split works on flat batches).

    Raises:
        TypeError: Naming the argument.
    """
    leaves = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    if any(isinstance(leaf, (dict, tuple, list)) for leaf in leaves):
        raise TypeError(f"DPSGD: the batches of {where} are nested; DP-SGD splits flat batches (a Tensor, or a "
                        "tuple, list or dict of Tensors) into examples. Flatten them in the data.")


def batch_size(batch) -> int:
    """The leading dimension of a batch's first leaf."""
    return int(_first_leaf(batch).shape[0])


def slice_batch(batch, start: int, stop: int):
    if isinstance(batch, dict):
        return {key: value[start:stop] for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(value[start:stop] for value in batch)
    return batch[start:stop]


def batch_leaves(batch):
    """A flat batch's Tensors as a tuple (graph-parseable): vmap maps over tuples, not dicts."""
    if isinstance(batch, dict):
        return tuple(batch.values())
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def batch_builder(example):
    """A graph-parseable function turning `batch_leaves(batch)` back into a batch shaped like `example`."""
    if isinstance(example, dict):
        keys = tuple(example.keys())

        def as_dict(leaves):
            return {keys[i]: leaves[i] for i in range(len(keys))}

        return as_dict
    if isinstance(example, list):
        return _as_list
    if isinstance(example, tuple):
        return _as_tuple
    return _as_tensor


def _as_list(leaves):
    return list(leaves)


def _as_tuple(leaves):
    return leaves


def _as_tensor(leaves):
    return leaves[0]


def per_example_gradients(example_step, weights, example_batch):
    """A function `(batch, batch_idx) -> per-example gradients` (each [B, *weight shape]) of the training loss.

    Args:
        example_step: training_step of a view of the module that logs nothing (`ModuleBinding.silent_twin`).
        weights: The trained Parameters (a ParameterTuple).
        example_batch: A batch shaped like the run's.
    """
    rebuild = batch_builder(example_batch)

    def example_loss(leaves, batch_idx):
        output = example_step(rebuild(leaves), batch_idx)
        return output["loss"] if isinstance(output, dict) else output

    mapped = ms.vmap(ms.grad(example_loss, None, weights), in_axes=(0, None))

    def gradients(batch, batch_idx):
        return mapped(batch_leaves(split_examples(batch)), batch_idx)

    return gradients


def _as_single_example_batches(value):
    """[B, ...] -> [B, 1, ...]: mapping over axis 0 then gives batches of one example."""
    return ops.expand_dims(value, 1)


def split_examples(batch):
    """Each leaf of a batch with a new axis 1 (graph-parseable): vmap over axis 0 sees one-example batches."""
    if isinstance(batch, dict):
        return {key: _as_single_example_batches(value) for key, value in batch.items()}
    if isinstance(batch, list):
        return [_as_single_example_batches(value) for value in batch]
    if isinstance(batch, tuple):
        return tuple([_as_single_example_batches(value) for value in batch])
    return _as_single_example_batches(batch)


def examples_in(batch):
    """The number of examples of a batch, as a float32 scalar (graph-parseable; static under compilation)."""
    if isinstance(batch, dict):
        return examples_in(tuple(batch.values()))
    if isinstance(batch, (tuple, list)):
        return ops.cast(ops.shape(batch[0])[0], ms.float32)
    return ops.cast(ops.shape(batch)[0], ms.float32)


def _squared_norms(grad):
    """Each example's squared L2 norm of one parameter's per-example gradient [B, ...] -> [B]."""
    return ops.reshape(grad * grad, (ops.shape(grad)[0], -1)).sum(axis=1)


def _weighted_sum(weights, grad):
    """sum_b weights[b] * grad[b]."""
    return ops.tensor_dot(weights, grad, ((0,), (0,)))


def clipped_sum(per_example, max_norm: float):
    """Clips each example's gradients to global L2 norm `max_norm` and sums them over the examples.

    Args:
        per_example: A tuple of per-example gradients, each [B, *parameter shape].
        max_norm: The clipping norm.

    Returns:
        A tuple of summed gradients, one per parameter.
    """
    norms = ops.sqrt(sum(_hyper_map(_squared_norms, per_example)))
    factors = ops.minimum(ops.ones_like(norms), max_norm / (norms + 1e-6))
    return _hyper_map(ops.partial(_weighted_sum, factors), per_example)


# ---- the noise stage -------------------------------------------------------------------------------
class NoiseStream:
    """The noise of the run's optimizer steps, drawn on the host from numpy's PCG64, one flat row per step.

    MindSpore's generator-driven normal ops have no CPU kernels, its seeded ones keep their
    state inside the kernel where a checkpoint cannot reach it, and a hash-based generator
    in the graph costs more than the step (`benchmarks/README.md`). numpy draws a row in
    about the time of one small kernel, and its state is a small JSON-serialisable dict.

    Args:
        size: Draws per optimizer step (the trained parameters' elements).
        seed: The stream's seed.
    """

    def __init__(self, size: int, seed: int):
        self.size = int(size)
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def draw(self, rows: int) -> np.ndarray:
        """The next `rows` optimizer steps' standard normal noise, float32 [rows, size]."""
        return self.generator.standard_normal((rows, self.size), dtype=np.float32)

    def state_dict(self) -> dict:
        return self.generator.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.generator.bit_generator.state = state


class PrivacyStage(nn.Cell):
    """The DP-SGD gradient stage: adds the noise to a window's summed clipped gradients and divides by its examples.

    The number of examples in the open window is a Parameter (saved in checkpoints through the
    engine's `state_dict`); the noise comes in as a flat standard normal row per step.

    Args:
        max_grad_norm: The clipping norm.
        noise_std: The noise's standard deviation (noise_multiplier * max_grad_norm).
        seed: The noise stream's seed.
        shapes: The gradients' shapes, in order.
    """

    def __init__(self, max_grad_norm: float, noise_std: float, seed: int, shapes):
        super().__init__(auto_prefix=False)
        self.max_grad_norm, self.noise_std = float(max_grad_norm), float(noise_std)
        self.shapes = tuple(tuple(shape) for shape in shapes)
        self.sizes = tuple(int(np.prod(shape)) for shape in self.shapes)
        self.stream = NoiseStream(sum(self.sizes), seed)
        self.examples = Parameter(Tensor(0.0, ms.float32), name="lightms.privacy.examples", requires_grad=False)

    def state_parameters(self):
        """name -> Parameter, for the engine's state_dict."""
        return {"privacy.examples": self.examples}

    def count(self, batch):
        """Adds a micro-batch's examples to the window (graph-parseable); returns the new count."""
        return ops.assign_add(self.examples, examples_in(batch))

    def construct(self, grads, noise):
        """(sum of clipped per-example gradients + std * noise) / examples; the window's count starts again.

        Args:
            grads: The window's summed clipped gradients.
            noise: A flat float32 row of standard normal values, one per gradient element.
        """
        examples = self.examples + 0.0  # read before it is reset
        pieces = ()
        start = 0
        for size, shape in zip(self.sizes, self.shapes):
            pieces += (ops.reshape(noise[start:start + size], shape) * self.noise_std,)
            start += size
        noised = _hyper_map(ops.add, grads, pieces)
        averaged = _hyper_map(ops.partial(_divide_by, examples), noised)
        return ops.depend(averaged, ops.assign(self.examples, ops.zeros_like(self.examples)))


def _divide_by(divisor, value):
    return value / divisor


__all__ = ["DPSGD", "PrivacyStage", "check_per_example_loss", "check_splittable", "clipped_sum", "examples_in",
           "NoiseStream", "per_example_gradients", "split_examples"]
