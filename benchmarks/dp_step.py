"""DP-SGD's step time against the plain step, side by side in one run.

Run:  python benchmarks/dp_step.py [--quick]

The digits MLP (64-128-128-10, batch 64, SGD) trains with `Trainer(plugins=[DPSGD(...)])`
and without, compiled. Each configuration runs a warm-up epoch (compiling), then timed
epochs; printed: median milliseconds per optimizer step and the ratio to the plain step.
"DP-SGD, no noise" (noise_multiplier=0) separates the per-example clipping from the noise.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import lightms  # noqa: E402
from lightms.callbacks import Callback  # noqa: E402
from lightms.privacy import DPSGD  # noqa: E402
from mindspore import nn  # noqa: E402


class EpochTimer(Callback):
    def __init__(self):
        self.times, self._start = [], None

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self._start)


def make_model(width: int):
    class MLP(lightms.LightningCell):
        def __init__(self):
            super().__init__()
            self.net = nn.SequentialCell(nn.Dense(64, width), nn.ReLU(), nn.Dense(width, width), nn.ReLU(),
                                         nn.Dense(width, 10))
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.loss_fn(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return nn.SGD(self.trainable_params(), learning_rate=0.05)

    return MLP()


def measure(plugin, batches, epochs: int, width: int) -> float:
    lightms.seed_everything(0)
    timer = EpochTimer()
    trainer = lightms.Trainer(max_epochs=epochs + 1, plugins=[plugin] if plugin else None, callbacks=[timer],
                              logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(make_model(width), batches)
    per_epoch = statistics.median(timer.times[1:])  # the first epoch compiles
    return 1000 * per_epoch / len(batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else 5
    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size * 20, 64), dtype=np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    rows = [("plain step", None), ("DP-SGD, no noise", DPSGD(1.0, 0.0)), ("DP-SGD", DPSGD(1.0, 1.1))]
    times = {name: measure(plugin, batches, epochs, args.width) for name, plugin in rows}
    print(f"MLP 64-{args.width}-{args.width}-10, batch {args.batch_size}, SGD, compiled; "
          f"median of {epochs} epochs of {len(batches)} steps")
    for name, _ in rows:
        print(f"  {name:18s} {times[name]:8.2f} ms/step   x{times[name] / times['plain step']:.2f}")


if __name__ == "__main__":
    main()
