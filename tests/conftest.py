"""Shared test pieces: small seeded models and data, and a hand-written MindSpore reference loop."""

import numpy as np
import pytest

import lightms
from lightms import LightningCell
from lightms.loggers import Logger
from lightms._mindspore import mindspore as ms
from mindspore import nn


class TinyRegressor(LightningCell):
    """A 6-8-1 MLP with a mean-squared-error loss and plain SGD."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.SequentialCell(nn.Dense(6, 8), nn.Tanh(), nn.Dense(8, 1))

    def construct(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return nn.SGD(self.trainable_params(), learning_rate=self.hparams.lr)


class AdamRegressor(TinyRegressor):
    """TinyRegressor with a stateful optimizer (Adam, lr 1e-2)."""

    def configure_optimizers(self):
        return nn.Adam(self.trainable_params(), learning_rate=1e-2)


class StepDecayRegressor(TinyRegressor):
    """SGD (lr 0.1) with a host-side StepLR halving the rate every `decay_every` optimizer steps."""

    decay_every = 1

    def configure_optimizers(self):
        from mindspore.experimental import optim

        optimizer = optim.SGD(self.trainable_params(), lr=0.1)
        scheduler = optim.lr_scheduler.StepLR(optimizer, self.decay_every, 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_data(samples: int, seed: int = 0):
    """Returns seeded regression data (x float32 [n, 6], y float32 [n, 1])."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 1)) + 0.1).astype(np.float32)
    return x, y


def batches_of(x, y, size: int):
    """Splits arrays into a list of (x, y) batches, the last one possibly smaller."""
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def fresh_model(seed: int = 0, cls=TinyRegressor, **kwargs):
    """Builds a model from a fixed seed so two models start from the same weights."""
    lightms.seed_everything(seed)
    return cls(**kwargs)


def parameters_of(cell) -> dict:
    """Returns name -> numpy copy of every trainable parameter."""
    return {p.name: p.asnumpy().copy() for p in cell.trainable_params()}


def reference_sgd(model: TinyRegressor, windows, lr: float):
    """A hand-written MindSpore loop: one SGD update per window, gradient = mean over the window's batches.

    Args:
        model: The model to update in place (its own construct is the forward).
        windows: A list of lists of (x, y) numpy batches.
        lr: SGD learning rate.
    """
    weights = model.trainable_params()
    optimizer = nn.SGD(weights, learning_rate=lr)

    def loss_fn(x, y):
        return ((model.net(x) - y) ** 2).mean()

    grad_fn = ms.grad(loss_fn, None, weights)
    for window in windows:
        total = None
        for x, y in window:
            grads = grad_fn(ms.Tensor(x), ms.Tensor(y))
            total = grads if total is None else tuple(a + b for a, b in zip(total, grads))
        optimizer(tuple(g / len(window) for g in total))


class RecordingLogger(Logger):
    """A logger that keeps every call in memory."""

    def __init__(self):
        self.metrics = []  # (step, dict)
        self.hparams = None
        self.status = None  # what finalize was called with

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params):
        self.hparams = dict(params)

    def finalize(self, status):
        self.status = status

    def values(self, name):
        """Returns [(step, value)] for one metric name."""
        return [(step, m[name]) for step, m in self.metrics if name in m]


def quiet_trainer(**kwargs):
    """A Trainer with no progress bar, logger, checkpointing or sanity check, unless overridden."""
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("enable_checkpointing", False)
    return lightms.Trainer(**kwargs)


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Runs every test in its own folder so nothing lands in the checkout."""
    monkeypatch.chdir(tmp_path)
