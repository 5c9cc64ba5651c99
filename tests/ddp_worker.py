"""A training script the data-parallel tests launch on 2 workers (`python -m lightms.launch`).

Usage: ddp_worker.py OUT_DIR [raise | long]. For each configuration it trains a fresh, seeded model
on the global batches (each worker reads every other one) and saves its parameters and logged
values to OUT_DIR/<config>-rank<r>.npz. With "raise", rank 1 raises after its first fit. With
"long", one fit of many epochs that writes OUT_DIR/training once it trains (to be signalled).
"""

import os
import sys

import numpy as np

import lightms
import lightms.callbacks
from mindspore import nn

CONFIGS = {"plain": {}, "acc2": {"accumulate": 2}, "sink2": {"sink_size": 2}, "clip": {"gradient_clip_val": 0.05},
           "mixed": {"precision": "16-mixed"}, "manual": {}, "unseeded": {}}


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


class ManualRegressor(Regressor):
    """The same updates written with manual optimization (self.value_and_grad averages over the workers)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()

        def loss_fn(x, y):
            return ((self.net(x) - y) ** 2).mean()

        loss, grads = self.value_and_grad(loss_fn, opt)(x, y)
        self.optimizer_step(opt, grads)
        self.log("loss", loss, on_step=False, on_epoch=True)
        self.log("loss_mean", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("loss_max", loss, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        self.log("loss_own_max", loss, on_step=False, on_epoch=True, reduce_fx="max")
        return loss


def model_for(config: str):
    return ManualRegressor() if config == "manual" else Regressor()


def global_batches(count: int = 8, size: int = 4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count * size, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 1)) + 0.1).astype(np.float32)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


class Announce(lightms.callbacks.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1:
            open(self.path, "w").close()


def train_long(out_dir: str) -> None:
    lightms.seed_everything(0)
    trainer = lightms.Trainer(max_epochs=100000, default_root_dir=out_dir, enable_progress_bar=False,
                              callbacks=[Announce(os.path.join(out_dir, "training")),
                                         lightms.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(Regressor(), global_batches())


def main(out_dir: str, fail: bool) -> None:
    for name, options in CONFIGS.items():
        # "unseeded": each worker builds other initial weights (rank 0's are the reference's), and passes its own
        # progress bar (rank 1 drops it).
        lightms.seed_everything(int(os.environ.get("RANK_ID", "0")) if name == "unseeded" else 0)
        model = model_for(name)
        bar = {"callbacks": [lightms.callbacks.TQDMProgressBar(refresh_rate=100)]} if name == "unseeded" else \
            {"enable_progress_bar": False}
        # "auto" data-parallel when msrun started several workers; "ddp" says it.
        trainer = lightms.Trainer(max_epochs=1, default_root_dir=os.path.join(out_dir, name),
                                  strategy="auto" if name == "plain" else "ddp", **bar, **options)
        trainer.fit(model, global_batches())
        params = {p.name: p.asnumpy() for p in model.trainable_params()}
        metrics = {f"metric:{k}": np.float64(v) for k, v in trainer.callback_metrics.items()}
        np.savez(os.path.join(out_dir, f"{name}-rank{trainer.global_rank}.npz"), world_size=trainer.world_size,
                 **params, **metrics)
        if fail and trainer.global_rank == 1:
            raise RuntimeError("rank 1 fails on purpose")


if __name__ == "__main__":
    if "long" in sys.argv[2:]:
        train_long(sys.argv[1])
    else:
        main(sys.argv[1], "raise" in sys.argv[2:])
