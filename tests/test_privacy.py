"""DP-SGD in the compiled step, against a closed form in numpy, and its accounting against dp-accounting."""

import numpy as np
import pytest

import lightms
from lightms import LightningCell
from lightms.privacy import DPSGD
from mindspore import nn

from conftest import RecordingLogger, quiet_trainer

LR, CLIP = 0.1, 0.5


class Linear(LightningCell):
    """y = w.x + b with a mean squared error: each example's gradient has a closed form."""

    def __init__(self, features: int = 6):
        super().__init__()
        self.dense = nn.Dense(features, 1)

    def construct(self, x):
        return self.dense(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return nn.SGD(self.trainable_params(), learning_rate=LR)


def data(batches: int = 4, size: int = 8, features: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batches * size, features)).astype(np.float32)
    y = (x @ rng.standard_normal((features, 1)) + 0.3).astype(np.float32)
    y[3] += 40.0  # an outlier: its gradient is far above the clipping norm
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def numpy_dpsgd(w, b, batches, accumulate: int, epochs: int):
    """DP-SGD without noise, by hand: per-example gradients of (w.x + b - y)^2, clipped, summed, averaged."""
    w, b = w.astype(np.float64).copy(), b.astype(np.float64).copy()
    for _ in range(epochs):
        for start in range(0, len(batches), accumulate):
            total_w, total_b, count = np.zeros_like(w), np.zeros_like(b), 0
            for x, y in batches[start:start + accumulate]:
                residual = x @ w.T + b - y  # [B, 1]
                grad_w, grad_b = 2 * residual * x, 2 * residual  # each example's, [B, F] and [B, 1]
                norms = np.sqrt((grad_w ** 2).sum(1) + (grad_b ** 2).sum(1))
                factor = np.minimum(1.0, CLIP / (norms + 1e-6))[:, None]
                total_w += (factor * grad_w).sum(0)
                total_b += (factor * grad_b).sum(0)
                count += len(x)
            w -= LR * total_w / count
            b -= LR * total_b / count
    return w, b


def fit(batches, epochs=1, noise=0.0, seed=0, **kwargs):
    lightms.seed_everything(0)
    model = Linear(batches[0][0].shape[1])
    plugin = DPSGD(max_grad_norm=CLIP, noise_multiplier=noise, delta=1e-5, seed=seed)
    start = model.dense.weight.asnumpy().copy(), model.dense.bias.asnumpy().copy()
    trainer = quiet_trainer(max_epochs=epochs, plugins=[plugin], **kwargs)
    trainer.fit(model, batches)
    return model, trainer, plugin, start


@pytest.mark.parametrize("compile,accumulate,sink_size", [(True, 1, 1), (True, 2, 1), (True, 2, 4), (False, 2, 1)])
def test_without_noise_the_update_is_the_average_of_clipped_per_example_gradients(compile, accumulate, sink_size):
    batches = data()
    model, trainer, _, (w0, b0) = fit(batches, epochs=2, compile=compile, accumulate=accumulate, sink_size=sink_size)
    w, b = numpy_dpsgd(w0, b0, batches, accumulate, epochs=2)
    np.testing.assert_allclose(model.dense.weight.asnumpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.dense.bias.asnumpy(), b, rtol=1e-5, atol=1e-6)
    assert trainer.global_step == 2 * len(batches) // accumulate


def test_one_outliers_influence_is_bounded_by_the_clip_norm():
    batches = data(batches=1)
    changed = [(x.copy(), y.copy()) for x, y in batches]
    changed[0][1][3] -= 1e4  # the outlier pulls the other way, 250 times as hard
    moved = []
    for run in (batches, changed):
        model, _, _, _ = fit(run, epochs=1)
        moved.append(np.concatenate([model.dense.weight.asnumpy().ravel(), model.dense.bias.asnumpy()]))
    difference = np.linalg.norm(moved[0] - moved[1])
    # Both clipped to norm C in opposite directions: the updates differ by lr * 2C / B, and no more.
    assert difference == pytest.approx(2 * LR * CLIP / 8, rel=1e-4)


@pytest.mark.parametrize("accumulate,sink_size", [(1, 1), (2, 4)])
def test_the_noise_has_the_right_standard_deviation(accumulate, sink_size):
    # With zero inputs and targets the weights' gradient is zero, so their update is the noise alone, times
    # lr / examples (the bias is left out: its gradient is not zero once it moved). The seed is fixed,
    # so the draws are the same on every run: the tolerance (3%, against a sampling error of 0.9% for 6k values)
    # cannot flake. Sunk with accumulation, each optimizer step's noise must land on its window's closing row.
    batches = [(np.zeros((8, 6000), np.float32), np.zeros((8, 1), np.float32))] * 4
    noise_multiplier = 1.3
    model, trainer, _, (w0, b0) = fit(batches, epochs=1, noise=noise_multiplier, seed=11, accumulate=accumulate,
                                      sink_size=sink_size)
    steps, examples = 4 // accumulate, 8 * accumulate
    assert trainer.global_step == steps
    noise = (model.dense.weight.asnumpy() - w0).ravel()  # the bias is left out: its gradient is not zero
    noise /= -LR / examples * np.sqrt(steps)  # the steps' independent noise added up
    assert noise.std() == pytest.approx(noise_multiplier * CLIP, rel=0.03)
    assert abs(noise.mean()) < 0.03 * noise_multiplier * CLIP


def test_a_resumed_run_draws_the_same_noise(tmp_path):
    batches = data()
    straight, _, _, _ = fit(batches, epochs=2, noise=1.1, seed=5)
    _, first, _, _ = fit(batches, epochs=1, noise=1.1, seed=5)
    path = str(tmp_path / "dp.ckpt")
    first.save_checkpoint(path)
    lightms.seed_everything(0)
    resumed = Linear()
    quiet_trainer(max_epochs=2, plugins=[DPSGD(max_grad_norm=CLIP, noise_multiplier=1.1, seed=5)]).fit(
        resumed, batches, ckpt_path=path)
    np.testing.assert_allclose(resumed.dense.weight.asnumpy(), straight.dense.weight.asnumpy(), rtol=1e-6, atol=1e-7)
    other, _, _, _ = fit(batches, epochs=2, noise=1.1, seed=6)
    assert not np.allclose(other.dense.weight.asnumpy(), straight.dense.weight.asnumpy())


def test_epsilon_is_the_accountants_and_is_logged_each_epoch():
    import dp_accounting

    batches = data()
    batches[-1] = (batches[-1][0][:3], batches[-1][1][:3])  # 27 examples: a step of 2 batches samples 16/27
    logger = RecordingLogger()
    _, trainer, plugin, _ = fit(batches, epochs=3, noise=1.1, accumulate=2, logger=logger)
    steps, rate = 3 * len(batches) // 2, 16 / 27
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1.1)), steps)
    assert plugin.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    logged = logger.values("epsilon")
    assert len(logged) == 3 and logged[-1][1] == pytest.approx(plugin.epsilon, rel=1e-6)
    assert logged[0][1] < logged[1][1] < logged[2][1]
    assert trainer.callback_metrics["epsilon"] == pytest.approx(plugin.epsilon, rel=1e-6)


def test_a_loss_that_mixes_examples_or_batchnorm_is_refused():
    class Mixing(Linear):
        def training_step(self, batch, batch_idx):
            x, y = batch
            error = self(x) - y
            return ((error - error.mean()) ** 2).mean()  # each example's loss depends on the others

    class WithBatchNorm(Linear):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(6)

        def construct(self, x):
            return self.dense(self.norm(x))

    for cls, match in [(Mixing, "mixes examples"), (WithBatchNorm, "BatchNorm")]:
        with pytest.raises(ValueError, match=match):
            quiet_trainer(max_epochs=1, plugins=[DPSGD()]).fit(cls(), data())
    with pytest.raises(ValueError, match="drop gradient_clip_val"):
        quiet_trainer(max_epochs=1, plugins=[DPSGD()], gradient_clip_val=1.0).fit(Linear(), data())
    with pytest.raises(TypeError, match="plugins"):
        quiet_trainer(plugins=["ddp"])


def test_sunk_steps_log_what_single_steps_log():
    batches = data(batches=6)
    logged = []
    for sink_size in (1, 3):
        logger = RecordingLogger()
        fit(batches, epochs=1, noise=0.7, seed=3, sink_size=sink_size, logger=logger, log_every_n_steps=1)
        logged.append(logger.values("loss"))
    assert [step for step, _ in logged[0]] == list(range(1, 7))
    assert logged[1] == [(step, pytest.approx(value, rel=1e-6)) for step, value in logged[0]]
    # The first step's logged loss is the batch's mean squared error before any update.
    lightms.seed_everything(0)
    model = Linear()
    x, y = batches[0]
    expected = ((x @ model.dense.weight.asnumpy().T + model.dense.bias.asnumpy() - y) ** 2).mean()
    assert logged[0][0][1] == pytest.approx(expected, rel=1e-5)


def test_the_default_noise_seed_is_secret_and_dropout_is_refused_by_name():
    assert DPSGD().seed != DPSGD().seed  # the operating system's entropy, not a fixed default

    class WithDropout(Linear):
        def __init__(self):
            super().__init__()
            self.dropout = nn.Dropout(p=0.5)

        def construct(self, x):
            return self.dense(self.dropout(x))

    with pytest.raises(ValueError, match="Dropout in training mode \\(dropout\\)"):  # not "mixes examples"
        quiet_trainer(max_epochs=1, plugins=[DPSGD(seed=0)]).fit(WithDropout(), data())


def test_data_the_accountant_cannot_count_and_nested_batches_are_refused():
    class Unsized:
        def __iter__(self):
            return iter(data())

    with pytest.raises(ValueError, match="dataset_size"):
        quiet_trainer(max_epochs=1, plugins=[DPSGD(seed=0)]).fit(Linear(), Unsized())
    _, _, plugin, _ = fit(data(), epochs=1)  # a list: counted
    assert plugin.sampling_rate == pytest.approx(8 / 32)

    class Nested(Linear):
        def training_step(self, batch, batch_idx):
            (x,), y = batch
            return ((self(x) - y) ** 2).mean()

    nested = [((x,), y) for x, y in data()]
    with pytest.raises(TypeError, match="nested"):
        quiet_trainer(max_epochs=1, plugins=[DPSGD(seed=0)]).fit(Nested(), nested)
