"""Manual optimization: several optimizers stepped from training_step, against a hand-written MindSpore loop."""

import numpy as np
import pytest

import lightms
from lightms import LightningCell
from lightms._mindspore import mindspore as ms
from mindspore import Tensor, nn, ops

from conftest import RecordingLogger, TinyRegressor, quiet_trainer

LR_D, LR_G = 0.05, 0.1


class TwoNets(nn.Cell):
    """A 'discriminator' (3 -> 4 -> 1) and a 'generator' (2 -> 3), as in a GAN."""

    def __init__(self):
        super().__init__()
        self.disc = nn.SequentialCell(nn.Dense(3, 4), nn.Tanh(), nn.Dense(4, 1))
        self.gen = nn.Dense(2, 3)


def d_loss(nets, x, z):
    return (nets.disc(x) - 1).square().mean() + nets.disc(nets.gen(z)).square().mean()


def g_loss(nets, z):
    return (nets.disc(nets.gen(z)) - 1).square().mean()


class TwoOptimizers(LightningCell):
    """The discriminator steps on every batch, then the generator on odd batches, on the updated discriminator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.nets = TwoNets()

    def training_step(self, batch, batch_idx):
        x, z = batch
        opt_d, opt_g = self.optimizers()

        def discriminator(x, z):
            return d_loss(self.nets, x, z)

        def generator(z):
            return g_loss(self.nets, z)

        loss_d, grads = self.value_and_grad(discriminator, opt_d)(x, z)
        self.optimizer_step(opt_d, grads)
        loss_g = generator(z)
        if batch_idx % 2 == 1:
            loss_g, grads = self.value_and_grad(generator, opt_g)(z)
            self.optimizer_step(opt_g, self.clip_gradients(grads, gradient_clip_val=0.01))
        self.log("loss_d", loss_d)
        self.log("loss_g", loss_g)
        return loss_d + loss_g

    def configure_optimizers(self):
        return [nn.Adam(self.nets.disc.trainable_params(), learning_rate=LR_D),
                nn.SGD(self.nets.gen.trainable_params(), learning_rate=LR_G)]


def gan_batches(count: int = 6, size: int = 4):
    rng = np.random.default_rng(3)
    return [(rng.standard_normal((size, 3)).astype(np.float32), rng.standard_normal((size, 2)).astype(np.float32))
            for _ in range(count)]


def reference(batches, epochs: int):
    """The same updates written with MindSpore alone (PyNative), from the same initial weights."""
    lightms.seed_everything(0)
    nets = TwoNets()
    opt_d = nn.Adam(nets.disc.trainable_params(), learning_rate=LR_D)
    opt_g = nn.SGD(nets.gen.trainable_params(), learning_rate=LR_G)
    step_d = ms.value_and_grad(lambda x, z: d_loss(nets, x, z), None, opt_d.parameters)
    step_g = ms.value_and_grad(lambda z: g_loss(nets, z), None, opt_g.parameters)
    for _ in range(epochs):
        for index, (x, z) in enumerate(batches):
            _, grads = step_d(Tensor(x), Tensor(z))
            opt_d(grads)
            if index % 2 == 1:
                _, grads = step_g(Tensor(z))
                opt_g(ops.clip_by_global_norm(grads, 0.01))
    return {p.name: p.asnumpy() for p in nets.trainable_params()}


@pytest.mark.parametrize("compile,sink_size", [(True, 1), (True, 3), (False, 1)])
def test_two_optimizers_equal_a_hand_written_loop(compile, sink_size):
    batches = gan_batches()
    lightms.seed_everything(0)
    model = TwoOptimizers()
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=2, compile=compile, sink_size=sink_size, logger=logger, log_every_n_steps=1)
    trainer.fit(model, batches)
    expected = reference(batches, epochs=2)
    got = {p.name.replace("nets.", "", 1): p.asnumpy() for p in model.trainable_params()}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    # global_step counts training_step calls (batches), not the three optimizer updates of two batches.
    assert trainer.global_step == 12
    opt_d, opt_g = trainer.optimizers
    # Each optimizer's own counter counts its updates.
    assert int(opt_d.global_step.asnumpy()) == 12 and int(opt_g.global_step.asnumpy()) == 6
    assert [step for step, _ in logger.values("loss_d")] == list(range(1, 13))
    assert np.isfinite([value for _, value in logger.values("loss_g")]).all()


def test_the_second_optimizers_state_is_named_apart_and_resumes(tmp_path):
    batches = gan_batches()
    lightms.seed_everything(0)
    model = TwoOptimizers()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, batches)
    names = [p.name for opt in trainer.optimizers for p in opt.get_parameters()
             if p.name.endswith("global_step") or p.name.endswith("learning_rate")]
    assert len(names) == len(set(names)) == 4
    assert int(trainer.optimizers[0].global_step.asnumpy()) == 6  # Adam: one update per batch
    path = str(tmp_path / "gan.ckpt")
    trainer.save_checkpoint(path)

    lightms.seed_everything(0)
    resumed = TwoOptimizers()
    quiet_trainer(max_epochs=2).fit(resumed, batches, ckpt_path=path)
    expected = reference(batches, epochs=2)
    for p in resumed.trainable_params():
        np.testing.assert_allclose(p.asnumpy(), expected[p.name.replace("nets.", "", 1)], rtol=1e-6, atol=1e-6)


def test_self_optimizers_returns_the_single_optimizer_and_schedulers_are_left_to_the_user():
    from mindspore.experimental import optim

    seen = {}

    class One(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()

            def loss_fn(x, y):
                return ((self(x) - y) ** 2).mean()

            loss, grads = self.value_and_grad(loss_fn, opt)(x, y)
            self.optimizer_step(opt, grads)

        def configure_optimizers(self):
            opt = optim.SGD(self.trainable_params(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": optim.lr_scheduler.StepLR(opt, 1, 0.5)}

        def on_train_epoch_end(self):
            seen["optimizer"] = self.optimizers()
            seen["scheduler"] = self.lr_schedulers()
            self.lr_schedulers().step()

    model = One()
    x = np.ones((4, 6), np.float32)
    before = model.net[0].weight.asnumpy().copy()
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, [(x, x[:, :1])] * 2)
    # training_step returned None: its updates still ran in the compiled graph.
    assert np.abs(model.net[0].weight.asnumpy() - before).max() > 1e-3
    assert seen["optimizer"] is trainer.optimizers[0]
    assert seen["scheduler"] is trainer.lr_scheduler_configs[0].scheduler
    lr = float(trainer.optimizers[0].param_groups[0]["lr"].asnumpy())
    assert lr == pytest.approx(0.1 * 0.5 ** 3)  # stepped by the hook only, once per epoch


def test_errors_point_to_the_manual_helpers():
    class Two(TinyRegressor):
        def configure_optimizers(self):
            return [nn.SGD(self.net[0].trainable_params(), 0.1), nn.SGD(self.net[2].trainable_params(), 0.1)]

    with pytest.raises(ValueError, match="automatic_optimization = False"):
        quiet_trainer(max_epochs=1).fit(Two(), gan_batches())
    batches = gan_batches()
    for kwargs, match in [({"accumulate": 2}, "optimizer_step every n batches"),
                          ({"gradient_clip_val": 1.0}, "self.clip_gradients")]:
        with pytest.raises(ValueError, match=match):
            quiet_trainer(max_epochs=1, **kwargs).fit(TwoOptimizers(), batches)


def test_optimizers_outside_a_fit_is_a_clear_error():
    with pytest.raises(RuntimeError, match="while Trainer.fit runs"):
        TwoOptimizers().optimizers()
    with pytest.raises(TypeError, match="True or False"):
        TwoOptimizers().automatic_optimization = 0


def test_value_and_grad_with_aux_and_value_clipping_equal_numpy():
    class Aux(LightningCell):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.dense = nn.Dense(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()

            def loss_fn(x, y):
                prediction = self.dense(x)
                return ((prediction - y) ** 2).mean(), prediction.mean()

            (loss, mean_prediction), grads = self.value_and_grad(loss_fn, opt, has_aux=True)(x, y)
            self.optimizer_step(opt, self.clip_gradients(grads, 0.2, "value"))
            self.log("mean_prediction", mean_prediction, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self):
            return nn.SGD(self.trainable_params(), learning_rate=0.1)

    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 1)).astype(np.float32))
               for _ in range(3)]
    lightms.seed_everything(0)
    model = Aux()
    w, b = model.dense.weight.asnumpy().astype(np.float64), model.dense.bias.asnumpy().astype(np.float64)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, batches)
    means = []
    for x, y in batches:  # by hand: the mean prediction before the update, gradients clamped to [-0.2, 0.2]
        prediction = x @ w.T + b
        means.append(prediction.mean())
        residual = 2 * (prediction - y) / len(x)
        w = w - 0.1 * np.clip(residual.T @ x, -0.2, 0.2)
        b = b - 0.1 * np.clip(residual.sum(0), -0.2, 0.2)
    np.testing.assert_allclose(model.dense.weight.asnumpy(), w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.dense.bias.asnumpy(), b, rtol=1e-6, atol=1e-6)
    assert trainer.callback_metrics["mean_prediction"] == pytest.approx(np.mean(means), rel=1e-5)


def test_learning_rate_monitor_names_two_optimizers_of_one_class_apart():
    from lightms.callbacks import LearningRateMonitor

    class TwoAdams(TwoOptimizers):
        def configure_optimizers(self):
            return [nn.Adam(self.nets.disc.trainable_params(), learning_rate=0.01),
                    nn.Adam(self.nets.gen.trainable_params(), learning_rate=0.02)]

    logger = RecordingLogger()
    quiet_trainer(max_epochs=1, logger=logger, callbacks=[LearningRateMonitor("epoch")]).fit(TwoAdams(), gan_batches())
    assert logger.values("lr-Adam") == [(0, pytest.approx(0.01))]
    assert logger.values("lr-Adam-1") == [(0, pytest.approx(0.02))]


def test_gradients_of_another_optimizer_are_a_clear_error():
    class Mixed(TwoOptimizers):
        def training_step(self, batch, batch_idx):
            x, z = batch
            opt_d, opt_g = self.optimizers()

            def discriminator(x, z):
                return d_loss(self.nets, x, z)

            loss, grads = self.value_and_grad(discriminator, opt_d)(x, z)
            self.optimizer_step(opt_g, grads)
            return loss

    with pytest.raises(ValueError, match=r"optimizer_step\(optimizers\(\)\[1\], grads\).*value_and_grad"):
        quiet_trainer(max_epochs=1).fit(Mixed(), gan_batches())


def test_a_per_step_scheduler_the_user_steps_leaves_sinking_on():
    from mindspore.experimental import optim

    calls = []

    class Scheduled(TwoOptimizers):
        def configure_optimizers(self):
            opt_d = optim.SGD(self.nets.disc.trainable_params(), lr=0.1)
            opt_g = optim.SGD(self.nets.gen.trainable_params(), lr=0.1)
            return ([opt_d, opt_g], [{"scheduler": optim.lr_scheduler.StepLR(opt_d, 1), "interval": "step"}])

        def on_train_batch_end(self, outputs, batch, batch_idx):
            calls.append(len(batch))

    trainer = quiet_trainer(max_epochs=1, sink_size=3)
    trainer.fit(Scheduled(), gan_batches())
    assert calls == [3, 3]  # two sunk chunks of three batches: the Trainer does not step that scheduler
    assert float(trainer.optimizers[0].param_groups[0]["lr"].asnumpy()) == pytest.approx(0.1)  # (StepLR's 0.1x)
