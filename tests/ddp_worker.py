"""A training script the data-parallel tests launch on 2 workers (`python -m lightms.launch`).

Usage: ddp_worker.py OUT_DIR [raise]. For each configuration it trains a fresh, seeded model on
the global batches (each worker reads every other one) and saves its parameters and logged
values to OUT_DIR/<config>-rank<r>.npz. With "raise", rank 1 raises after its first fit.
"""

import os
import sys

import numpy as np

import lightms
from mindspore import nn

CONFIGS = {"plain": {}, "acc2": {"accumulate": 2}, "sink2": {"sink_size": 2}}


class Regressor(lightms.LightningCell):
    def __init__(self):
        super().__init__()
        self.net = nn.SequentialCell(nn.Dense(6, 8), nn.Tanh(), nn.Dense(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("loss", loss, on_step=False, on_epoch=True)
        self.log("loss_mean", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("loss_max", loss, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        self.log("loss_own_max", loss, on_step=False, on_epoch=True, reduce_fx="max")
        return loss

    def configure_optimizers(self):
        return nn.SGD(self.trainable_params(), learning_rate=0.1)


def global_batches(count: int = 8, size: int = 4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count * size, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 1)) + 0.1).astype(np.float32)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def main(out_dir: str, fail: bool) -> None:
    for name, options in CONFIGS.items():
        lightms.seed_everything(0)
        model = Regressor()
        trainer = lightms.Trainer(max_epochs=1, default_root_dir=os.path.join(out_dir, name), strategy="ddp",
                                  enable_progress_bar=False, **options)
        trainer.fit(model, global_batches())
        params = {p.name: p.asnumpy() for p in model.trainable_params()}
        metrics = {f"metric:{k}": np.float64(v) for k, v in trainer.callback_metrics.items()}
        np.savez(os.path.join(out_dir, f"{name}-rank{trainer.global_rank}.npz"), world_size=trainer.world_size,
                 **params, **metrics)
        if fail and trainer.global_rank == 1:
            raise RuntimeError("rank 1 fails on purpose")


if __name__ == "__main__":
    main(sys.argv[1], "raise" in sys.argv[2:])
