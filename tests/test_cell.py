"""LightningCell: self(x) in compiled hooks, self.log values and names, counters, hyperparameters."""

import numpy as np
import pytest

from lightms._mindspore import mindspore as ms
from mindspore import nn
from conftest import RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer


class LogsData(TinyRegressor):
    """Logs functions of the data only, so expected values follow from numpy."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.shared_loss(x, y)  # a helper method that calls self(x)
        self.log("xmean", x.mean(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("xmax", x.max(), on_step=False, on_epoch=True, reduce_fx="max")
        self.log("count", x.shape[0] * 1.0, on_step=True, on_epoch=True, reduce_fx="sum")
        self.log("step_seen", self.global_step * 1.0)
        self.log("epoch_seen", self.current_epoch * 1.0, on_step=False, on_epoch=True)
        return loss

    def shared_loss(self, x, y):
        return ((self(x) - y) ** 2).mean()


@pytest.mark.parametrize("compile", [True, False])
def test_logged_values_match_numpy(compile):
    x, y = make_data(7 * 6)
    batches = batches_of(x, y, 6)
    batches = batches + [(x[:3], y[:3])]  # a smaller last batch: 8 batches
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=2, accumulate=3, log_every_n_steps=1, logger=logger, compile=compile)
    trainer.fit(fresh_model(cls=LogsData), batches)
    # windows per epoch: [b0 b1 b2] [b3 b4 b5] [b6 b7]; step values are over the whole window
    windows = [batches[0:3], batches[3:6], batches[6:8]]

    def window_mean(window):
        return sum(bx.sum() for bx, _ in window) / sum(bx.size for bx, _ in window)

    expected_steps = [window_mean(w) for w in windows] * 2
    got = logger.values("xmean_step")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in got], expected_steps, rtol=1e-5)
    counts = [v for _, v in logger.values("count_step")]
    assert counts == [18.0, 18.0, 9.0] * 2
    assert [v for _, v in logger.values("step_seen")] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # epoch values: batch-size-weighted mean (the small batch weighs less), max, sum
    all_x = np.concatenate([bx for bx, _ in batches])
    epoch = trainer.callback_metrics
    assert epoch["xmean_epoch"] == pytest.approx(float(all_x.mean()), rel=1e-5)
    assert epoch["xmean"] == epoch["xmean_epoch"]
    assert epoch["xmax"] == pytest.approx(float(all_x.max()), rel=1e-6)
    assert epoch["count_epoch"] == 45.0
    assert epoch["epoch_seen"] == 1.0
    epoch_logs = logger.values("epoch_seen")
    assert [v for _, v in epoch_logs] == [0.0, 1.0]
    assert trainer.progress_bar_metrics.keys() == {"xmean_step", "xmean_epoch"}


def test_self_call_works_in_every_compiled_hook():
    class AllHooks(TinyRegressor):
        def validation_step(self, batch, batch_idx):
            self.log("v", self.shared(batch))

        def test_step(self, batch, batch_idx):
            self.log("t", self.shared(batch))

        def predict_step(self, batch, batch_idx):
            return self(batch[0]) * 2

        def shared(self, batch):
            return self(batch[0]).mean()

    x, y = make_data(16)
    model = fresh_model(cls=AllHooks)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, batches_of(x, y, 8), batches_of(x, y, 8))
    expected = model.net(ms.Tensor(x)).asnumpy()
    assert trainer.validate(model, batches_of(x, y, 8))[0]["v"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert trainer.test(model, batches_of(x, y, 8))[0]["t"] == pytest.approx(float(expected.mean()), rel=1e-5)
    out = trainer.predict(model, batches_of(x, y, 8))
    np.testing.assert_allclose(np.concatenate([o.asnumpy() for o in out]), expected * 2, atol=1e-6)
    # After the run the module is an ordinary Cell again.
    assert "training_step" not in vars(model)


def test_log_in_host_hooks_and_log_dict():
    class EpochEnd(TinyRegressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = ((self(x) - y) ** 2).mean()
            self.log_dict({"a": loss * 0 + 1.0, "b": loss * 0 + 2.0})
            return loss

        def on_train_epoch_end(self):
            self.log("epoch_tag", 10.0 + self.current_epoch)

    x, y = make_data(16)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(fresh_model(cls=EpochEnd), batches_of(x, y, 8))
    assert logger.values("a") == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert logger.values("b")[0] == (1, 2.0)
    assert logger.values("epoch_tag") == [(2, 10.0), (4, 11.0)]


def test_save_hyperparameters():
    class WithHparams(TinyRegressor):
        def __init__(self, lr=0.1, hidden=8, name="x"):
            super().__init__(lr)
            self.save_hyperparameters(ignore="name")

    model = WithHparams(lr=0.3, hidden=4)
    assert dict(model.hparams) == {"lr": 0.3, "hidden": 4}
    assert model.hparams.lr == 0.3
    logger = RecordingLogger()
    x, y = make_data(8)
    quiet_trainer(max_epochs=1, logger=logger).fit(model, batches_of(x, y, 8))
    assert logger.hparams == {"lr": 0.3, "hidden": 4}


def test_save_hyperparameters_outside_init_is_an_error():
    with pytest.raises(RuntimeError, match="__init__"):
        TinyRegressor().save_hyperparameters()


def test_log_outside_a_run_is_an_error():
    with pytest.raises(RuntimeError, match="outside of a lightms.Trainer run"):
        TinyRegressor().log("x", 1.0)


def test_learning_rate_forms_are_accepted():
    class Schedule(nn.learning_rate_schedule.LearningRateSchedule):
        def construct(self, step):
            return 0.1 / (1.0 + step.astype(ms.float32))

    for lr in ([0.1, 0.05, 0.01, 0.01], ms.Tensor(np.array([0.1, 0.05, 0.01, 0.01], np.float32)), Schedule()):
        class Model(TinyRegressor):
            def configure_optimizers(self):
                return nn.SGD(self.trainable_params(), learning_rate=lr)

        x, y = make_data(32)
        trainer = quiet_trainer(max_epochs=1, accumulate=2)
        trainer.fit(fresh_model(cls=Model), batches_of(x, y, 8))
        assert int(trainer.optimizers[0].global_step.asnumpy()) == 2


class CountersFromAMixin:
    """A mixin that is not a LightningCell: its training_step reads the device counters."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("epoch_seen", self.current_epoch * 1.0, reduce_fx="max", on_step=False, on_epoch=True)
        self.log("step_seen", self.global_step * 1.0, reduce_fx="max", on_step=True, on_epoch=False)
        return ((self(x) - y) ** 2).mean()


class MixedIn(CountersFromAMixin, TinyRegressor):
    pass


@pytest.mark.parametrize("sink_size", [1, 2])
def test_counters_read_by_a_mixin_are_live_inside_compiled_steps(sink_size):
    x, y = make_data(24)
    logger = RecordingLogger()
    quiet_trainer(max_epochs=3, sink_size=sink_size, log_every_n_steps=1, logger=logger).fit(
        fresh_model(cls=MixedIn), batches_of(x, y, 8))
    assert [value for _, value in logger.values("epoch_seen")] == [0.0, 1.0, 2.0]
    # the step value is global_step as the step saw it: before its own update
    assert [value for _, value in logger.values("step_seen")] == [float(s) for s in range(9)]
