"""A training script the data-parallel tests launch on 2 workers (`python -m lightms.launch`).

Usage: ddp_worker.py OUT_DIR [raise | long | hang]. For each configuration it trains a fresh, seeded model
on the global batches (each worker reads every other one; "dataset" reads its shard of a
mindspore.dataset pipeline; "resumed" and "resumed_end" resume checkpoints one process wrote)
and saves its parameters, logged values and step values to OUT_DIR/<config>-rank<r>.npz. With
"raise", rank 1 raises after its first fit. With "long", one fit of many epochs that writes
OUT_DIR/training-rank<r> (holding the worker's pid) once it trains, to be signalled or killed;
with "hang", rank 1 then stops answering (it sleeps in a hook) under an 8-second DDPStrategy timeout.
"""

import os
import sys
import time

import numpy as np

import lightms
import lightms.callbacks
from mindspore import nn

CONFIGS = {"plain": {}, "acc2": {"accumulate": 2}, "sink2": {"sink_size": 2}, "clip": {"gradient_clip_val": 0.05},
           "mixed": {"precision": "16-mixed"}, "manual": {}, "unseeded": {}, "dataset": {}, "resumed": {},
           "resumed_end": {}}
# What one process wrote after 4 of the 8 batches, and after all 8 (before the epoch's end).
RESUMED_FROM = {"resumed": "one-process.ckpt", "resumed_end": "one-process-end.ckpt"}


class Regressor(lightms.LightningCell):
    def __init__(self):
        super().__init__()
        self.net = nn.SequentialCell(nn.Dense(6, 8), nn.Tanh(), nn.Dense(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        log_losses(self, loss)
        return loss

    def validation_step(self, batch, batch_idx):
        # Every worker validates all the data: its values are the whole data's, sync_dist or not.
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("val_loss", loss, sync_dist=True)
        self.log("val_rows", loss * 0 + x.shape[0], reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self):
        # Logged in a hook (on the host): with sync_dist, reduced over the workers as it is logged.
        self.log("rank_mean", float(self.trainer.global_rank), sync_dist=True)
        self.log("rank_max", float(self.trainer.global_rank), sync_dist=True, reduce_fx="max")

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
        log_losses(self, loss)
        return loss


def log_losses(module, loss):
    """Epoch values: this worker's own, and reduced over the workers at the epoch's end; step values: this worker's
    own, and reduced over the workers inside the compiled step."""
    module.log("loss", loss, on_step=False, on_epoch=True)
    module.log("loss_mean", loss, on_step=False, on_epoch=True, sync_dist=True)
    module.log("loss_max", loss, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
    module.log("loss_own_max", loss, on_step=False, on_epoch=True, reduce_fx="max")
    module.log("step_own", loss)
    module.log("step_mean", loss, sync_dist=True)
    module.log("step_min", loss, sync_dist=True, reduce_fx="min")
    module.log("step_own_min", loss, reduce_fx="min")  # of an accumulation window's micro-batches
    module.log("batches", loss * 0 + 1, reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=True)


class StepValues(lightms.callbacks.Callback):
    """Reads the step values after every optimizer step."""

    def __init__(self):
        self.values = {"step_own": [], "step_mean": [], "step_min": [], "step_own_min": [], "batches_step": []}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for name, values in self.values.items():
            values.append(trainer.callback_metrics.get(name, np.nan))  # none before the first step


def model_for(config: str):
    return ManualRegressor() if config == "manual" else Regressor()


def samples(count: int = 32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 6)).astype(np.float32)
    return x, (x @ rng.standard_normal((6, 1)) + 0.1).astype(np.float32)


def global_batches(count: int = 8, size: int = 4):
    x, y = samples(count * size)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def pipeline(batch_size: int):
    """36 shuffled rows: 18 per worker, so 5 batches of 4, 4, 4, 4, 2 (split by batch, each would get 4 of 9)."""
    import mindspore.dataset as msds

    return msds.NumpySlicesDataset(samples(36), column_names=["x", "y"], shuffle=True).batch(batch_size)


class Announce(lightms.callbacks.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1:
            with open(os.path.join(self.out_dir, f"training-rank{trainer.global_rank}"), "w") as f:
                f.write(str(os.getpid()))


class Hang(lightms.callbacks.Callback):
    """Rank 1 stops answering, as a worker on another machine that died would: its own watchdog is stopped (a
    dead worker's cannot act), so rank 0 must find out by itself."""

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 2 and trainer.global_rank == 1:
            trainer._watchdog.stop()
            time.sleep(3600)


class Stall(lightms.callbacks.Callback):
    """Rank 1 falls 12 s behind (as rank 0 does writing a large checkpoint): longer than msrun's scheduler is told
    to wait (the launcher's MS_NODE_TIMEOUT=10), shorter than the strategy's timeout; the run must go on."""

    def on_train_epoch_end(self, trainer, module):
        if trainer.global_rank == 1:
            time.sleep(12)


def train_long(out_dir: str, hang: bool = False) -> None:
    lightms.seed_everything(0)
    trainer = lightms.Trainer(max_epochs=100000, default_root_dir=out_dir, enable_progress_bar=False,
                              strategy=lightms.DDPStrategy(timeout=8) if hang else "auto",
                              callbacks=[Announce(out_dir)] + ([Hang()] if hang else [
                                         lightms.callbacks.ModelCheckpoint(save_last=True)]))
    trainer.fit(Regressor(), global_batches())


def main(out_dir: str, fail: bool) -> None:
    for name, options in CONFIGS.items():
        # "unseeded": each worker builds other initial weights (rank 0's are the reference's), and passes its own
        # progress bar (rank 1 drops it).
        lightms.seed_everything(int(os.environ.get("RANK_ID", "0")) if name == "unseeded" else 0)
        model = model_for(name)
        steps = StepValues()
        callbacks = [steps] + ([lightms.callbacks.TQDMProgressBar(refresh_rate=100)] if name == "unseeded" else []) \
            + ([Stall()] if name == "plain" else [])
        # "auto" data-parallel when msrun started several workers; "ddp" says it.
        trainer = lightms.Trainer(max_epochs=1, default_root_dir=os.path.join(out_dir, name),
                                  strategy="auto" if name == "plain" else "ddp", callbacks=callbacks,
                                  enable_progress_bar=name == "unseeded", **options)
        data = pipeline(4) if name == "dataset" else global_batches()
        trainer.fit(model, data, global_batches() if name == "plain" else None,
                    ckpt_path=os.path.join(out_dir, RESUMED_FROM[name]) if name in RESUMED_FROM else None)
        params = {p.name: p.asnumpy() for p in model.trainable_params()}
        metrics = {f"metric:{k}": np.float64(v) for k, v in trainer.callback_metrics.items()}
        np.savez(os.path.join(out_dir, f"{name}-rank{trainer.global_rank}.npz"), world_size=trainer.world_size,
                 global_step=trainer.global_step, num_training_batches=trainer.num_training_batches,
                 **{f"steps:{k}": np.array(v) for k, v in steps.values.items()}, **params, **metrics)
        if fail and trainer.global_rank == 1:
            raise RuntimeError("rank 1 fails on purpose")


if __name__ == "__main__":
    if "long" in sys.argv[2:] or "hang" in sys.argv[2:]:
        train_long(sys.argv[1], hang="hang" in sys.argv[2:])
    else:
        main(sys.argv[1], "raise" in sys.argv[2:])
