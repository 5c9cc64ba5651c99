"""Train the digits MLP with differential privacy (DP-SGD) and compare it with the non-private run.

Run:  python examples/dp_digits.py
Then: tensorboard --logdir lightning_logs   (loss, accuracy and epsilon per epoch)

`Trainer(plugins=[DPSGD(...)])` turns the compiled step into DP-SGD: each example's
gradient is clipped to `max_grad_norm`, the clipped gradients are summed, Gaussian
noise of standard deviation `noise_multiplier * max_grad_norm` is added once per
optimizer step, and the sum is divided by the examples. The model's training_step
is the ordinary one. The epsilon spent (for delta = 1e-5) comes from Google's
dp-accounting library (`pip install "lightms[privacy]"`).
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

import lightms
from lightms.privacy import DPSGD
from mindspore import nn


def _digits_example():
    """examples/digits.py as a module (its model and data), registered so MindSpore's parser can resolve it."""
    name = "digits_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "digits.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


digits = _digits_example()


class PrivateDigitsMLP(digits.DigitsMLP):
    """The digits MLP with plain SGD, as DP-SGD is usually run (Adam works too)."""

    def configure_optimizers(self):
        return nn.SGD(self.trainable_params(), learning_rate=self.hparams.lr, momentum=0.9)


class ShuffledBatches:
    """Fixed-size batches of a new shuffle of the examples each epoch (what the accountant assumes of the data)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # the last, smaller batch is dropped

    def __iter__(self):
        order = self.rng.permutation(len(self.x))
        for i in range(len(self)):
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[rows], self.y[rows]


def train(private: bool, args) -> dict:
    lightms.seed_everything(args.seed)
    train_batches, val_batches = digits.digits_batches(batch_size=args.batch_size, seed=args.seed)
    x, y = (np.concatenate(arrays) for arrays in zip(*train_batches))
    train_batches = ShuffledBatches(x, y, args.batch_size, args.seed)
    model = PrivateDigitsMLP(lr=args.lr)
    # dataset_size: ShuffledBatches is neither a list nor a mindspore.dataset, so the accountant is told. The
    # noise seed is fixed here only so that the example's output is reproducible: leave it out in real use.
    plugin = DPSGD(max_grad_norm=args.max_grad_norm, noise_multiplier=args.noise_multiplier, delta=1e-5,
                   seed=args.seed, dataset_size=len(x)) if private else None
    trainer = lightms.Trainer(max_epochs=args.epochs, default_root_dir=args.root, seed=args.seed,
                              plugins=[plugin] if plugin else None, enable_checkpointing=False,
                              enable_progress_bar=False, log_every_n_steps=10)
    start = time.perf_counter()
    trainer.fit(model, train_batches, val_batches)
    seconds = time.perf_counter() - start
    return {"accuracy": trainer.callback_metrics["val_acc"], "epsilon": plugin.epsilon if plugin else float("inf"),
            "seconds": seconds, "steps": trainer.global_step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=".", help="folder for lightning_logs/")
    args = parser.parse_args(argv)

    results = {"private": train(True, args), "plain": train(False, args)}
    private, plain = results["private"], results["plain"]
    print(f"DP-SGD:      validation accuracy {private['accuracy']:.4f}, epsilon {private['epsilon']:.2f} "
          f"(delta 1e-5, noise multiplier {args.noise_multiplier}, clip {args.max_grad_norm}), "
          f"{private['steps']} steps in {private['seconds']:.1f} s")
    print(f"non-private: validation accuracy {plain['accuracy']:.4f}, {plain['steps']} steps in "
          f"{plain['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
