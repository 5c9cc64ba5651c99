"""Data-parallel throughput on this machine: 1 worker against 2 (msrun), and the communication per step.

Run:  python benchmarks/ddp.py [--quick]

Trains the benchmark MLP (784-512-512-10, Adam) on random data: one process at the
global batch, then two msrun workers each at half of it (the same samples per optimizer
step). Each run times its epochs after a warm-up epoch. The communication cost is the
2-worker step time minus the 1-worker step time at the per-worker batch (what each worker
computes), measured in the same run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import json, sys, time
import numpy as np
import lightms
from lightms.callbacks import Callback
from mindspore import nn

batch, steps, epochs, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

class Timer(Callback):
    def __init__(self):
        self.times, self.start = [], None
    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()
    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.start)

class MLP(lightms.LightningCell):
    def __init__(self):
        super().__init__()
        self.net = nn.SequentialCell(nn.Dense(784, 512), nn.ReLU(), nn.Dense(512, 512), nn.ReLU(), nn.Dense(512, 10))
        self.loss_fn = nn.CrossEntropyLoss()
    def training_step(self, b, i):
        x, y = b
        return self.loss_fn(self.net(x), y)
    def configure_optimizers(self):
        return nn.Adam(self.trainable_params(), 1e-3)

lightms.seed_everything(0)
rng = np.random.default_rng(0)
timer = Timer()
trainer = lightms.Trainer(max_epochs=epochs + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=[timer])
workers = trainer.world_size
data = [(rng.random((batch, 784), dtype=np.float32), rng.integers(0, 10, batch).astype(np.int32))
        for _ in range(steps * workers)]
trainer.fit(MLP(), data)
if trainer.is_global_zero:
    json.dump({"ms_per_step": 1000 * float(np.median(timer.times[1:])) / steps, "workers": workers}, open(out, "w"))
'''


def run(batch: int, steps: int, epochs: int, workers: int) -> dict:
    folder = tempfile.mkdtemp(prefix="lightms-ddp-bench-")
    script = os.path.join(folder, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    out = os.path.join(folder, "result.json")
    args = [script, str(batch), str(steps), str(epochs), out]
    if workers == 1:
        command = [sys.executable] + args
    else:
        command = [sys.executable, "-m", "lightms.launch", "--devices", str(workers), "--log-dir",
                   os.path.join(folder, "logs")] + args
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return json.load(open(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=128, help="the global batch")
    args = parser.parse_args(argv)
    steps, epochs = (10, 2) if args.quick else (40, 4)
    start = time.time()
    one = run(args.batch, steps, epochs, 1)
    half = run(args.batch // 2, steps, epochs, 1)
    two = run(args.batch // 2, steps, epochs, 2)
    print(f"MLP 784-512-512-10, Adam, global batch {args.batch}; median ms per optimizer step over {epochs} epochs "
          f"of {steps} steps (after a warm-up epoch); {time.time() - start:.0f} s")
    rows = [("1 worker, batch %d" % args.batch, one["ms_per_step"], args.batch),
            ("1 worker, batch %d (one worker's share)" % (args.batch // 2), half["ms_per_step"], args.batch // 2),
            ("2 workers, batch %d each" % (args.batch // 2), two["ms_per_step"], args.batch)]
    for name, ms_per_step, samples in rows:
        print(f"  {name:42s} {ms_per_step:8.2f} ms/step  {1000 * samples / ms_per_step:9.0f} samples/s")
    print(f"  speed-up of 2 workers over 1: x{one['ms_per_step'] / two['ms_per_step']:.2f}; communication and "
          f"waiting per step: {two['ms_per_step'] - half['ms_per_step']:.2f} ms")


if __name__ == "__main__":
    main()
