"""What training_step returns and what self.log receives: clear errors before compilation."""

import numpy as np
import pytest

from lightms.callbacks import Callback
from lightms.module.device_logs import DeviceLogBuffers
from lightms.module.logging import LogOptions
from conftest import RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer


def _fit_with(step, compile=True):
    class Model(TinyRegressor):
        def training_step(self, batch, batch_idx):
            return step(self, batch)

    x, y = make_data(8)
    quiet_trainer(max_epochs=1, compile=compile).fit(fresh_model(cls=Model), batches_of(x, y, 4))


@pytest.mark.parametrize("step,error,text", [
    (lambda self, b: None, ValueError, "training_step returned None"),
    (lambda self, b: self(b[0]), ValueError, "scalar loss, got a tensor of shape \\(4, 1\\)"),
    (lambda self, b: {"out": self(b[0]).mean()}, ValueError, "without the key 'loss'"),
    (lambda self, b: 1.0, TypeError, "must return a scalar Tensor"),
])
def test_bad_training_step_outputs(step, error, text):
    with pytest.raises(error, match=text) as caught:
        _fit_with(step)
    assert "C++" not in str(caught.value)


def _dict_step(self, b):
    return {"loss": ((self(b[0]) - b[1]) ** 2).mean(), "extra": b[0].sum()}


def test_dict_with_loss_is_accepted():
    _fit_with(_dict_step)


@pytest.mark.parametrize("logged,error,text", [
    (lambda self, b: self.log("vec", b[0]), ValueError, "expected a single value"),
    (lambda self, b: self.log("x", 1.0, reduce_fx="median"), ValueError, "reduce_fx"),
    (lambda self, b: self.log("x", 1.0, on_step=False, on_epoch=False), ValueError, "nothing is logged"),
    (lambda self, b: self.log(3, 1.0), TypeError, "name must be"),
    (lambda self, b: self.log("x", "high"), TypeError, "expected a scalar"),
])
def test_bad_log_calls(logged, error, text):
    def step(self, batch):
        logged(self, batch)
        return ((self(batch[0]) - batch[1]) ** 2).mean()

    with pytest.raises(error, match=text) as caught:
        _fit_with(step)
    assert "C++" not in str(caught.value)


def test_buffers_reduce_like_numpy_in_eager_mode():
    options = [LogOptions("m", False, True, True, True, "mean", None),
               LogOptions("s", False, True, True, True, "sum", None),
               LogOptions("hi", False, True, True, True, "max", None),
               LogOptions("lo", False, True, True, True, "min", 2)]
    buffers = DeviceLogBuffers(options)
    import mindspore as ms
    from mindspore import ops

    values, sizes = [3.0, -1.0, 5.0], [4.0, 2.0, 1.0]
    for value, size in zip(values, sizes):
        ops.assign(buffers.batch_size, ms.Tensor(size, ms.float32))
        for name, reduce in (("m", "mean"), ("s", "sum"), ("hi", "max")):
            buffers.record(name, ms.Tensor(value, ms.float32), reduce, None)
        buffers.record("lo", ms.Tensor(value, ms.float32), "min", 2)
    window = buffers.read_window()
    buffers.close_window()
    step, epoch = buffers.read_step(), buffers.read_epoch()
    mean = float(np.average(values, weights=sizes))
    for read in (window, step, epoch):
        assert read["m"] == pytest.approx(mean)
        assert read["s"] == 7.0 and read["hi"] == 5.0 and read["lo"] == -1.0
    assert buffers.read_window() == {}  # the window was closed


class BatchStatistics(TinyRegressor):
    """Logs values numpy can compute from the batches alone: a step-only mean, an epoch-only mean and sum."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("xsum", x.sum())  # on_step only: training_step's default
        self.log("ymean", y.mean(), on_step=False, on_epoch=True)
        self.log("ysum", y.sum(), on_step=False, on_epoch=True, reduce_fx="sum")
        return ((self(x) - y) ** 2).mean()


@pytest.mark.parametrize("sink_size,accumulate", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_logged_step_and_epoch_values_equal_numpy(sink_size, accumulate):
    x, y = make_data(44)
    batches = batches_of(x, y, 8)  # 5 of 8 samples and one of 4
    logger = RecordingLogger()
    quiet_trainer(max_epochs=2, sink_size=sink_size, accumulate=accumulate, logger=logger,
                  log_every_n_steps=1).fit(fresh_model(cls=BatchStatistics), batches)
    windows = [batches[i:i + accumulate] for i in range(0, len(batches), accumulate)]
    # A step's value of a mean is the batch-size-weighted mean over its window's micro-batches.
    expected_steps = [float(np.average([bx.sum() for bx, _ in w], weights=[len(bx) for bx, _ in w]))
                      for w in windows]
    steps_per_epoch = len(windows)
    assert [step for step, _ in logger.values("xsum")] == list(range(1, 2 * steps_per_epoch + 1))
    np.testing.assert_allclose([value for _, value in logger.values("xsum")], expected_steps * 2, rtol=1e-5)
    np.testing.assert_allclose([value for _, value in logger.values("ymean")], [y.mean()] * 2, rtol=1e-5)
    np.testing.assert_allclose([value for _, value in logger.values("ysum")], [y.sum()] * 2, rtol=1e-5)
    assert [step for step, _ in logger.values("ymean")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert not any("xsum" in m and "ymean" in m for _, m in logger.metrics)  # step-only and epoch-only


class StepStatistics(TinyRegressor):
    """Logs on_step-only values of every reduction, each once a step: the records overwrite their values."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("xmean", x.mean())
        self.log("xsum", x.sum(), reduce_fx="sum")
        self.log("xmax", x.max(), reduce_fx="max")
        self.log("xmin", x.min(), reduce_fx="min")
        return ((self(x) - y) ** 2).mean()


class LoggedTwice(TinyRegressor):
    """Logs one name twice a step (same options): its step value is the mean of the two records."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("x", x.sum())
        self.log("x", x.max())
        return ((self(x) - y) ** 2).mean()


def fit_with_step_logger(cls, batches, **kwargs):
    """Fits a fresh `cls` on `batches`, logging every optimizer step to a RecordingLogger; returns both."""
    logger = RecordingLogger()
    trainer = quiet_trainer(logger=logger, log_every_n_steps=1, **kwargs)
    trainer.fit(fresh_model(cls=cls), batches)
    return trainer, logger


class SeenAtEpochStart(Callback):
    def __init__(self):
        self.metrics = []

    def on_train_epoch_start(self, trainer, module):
        self.metrics.append(dict(trainer.callback_metrics))


@pytest.mark.parametrize("sink_size", [1, 3])
def test_step_values_of_names_logged_once_equal_numpy_at_every_step(sink_size):
    x, y = make_data(44)
    batches = batches_of(x, y, 8)  # chunks of 3 and 3 (padded from 2 batches: 8 8 and 4 samples)
    logger, seen = RecordingLogger(), SeenAtEpochStart()
    trainer = quiet_trainer(max_epochs=2, sink_size=sink_size, logger=logger, log_every_n_steps=1, callbacks=[seen])
    trainer.fit(fresh_model(cls=StepStatistics), batches)
    for name, reduce in (("xmean", np.mean), ("xsum", np.sum), ("xmax", np.max), ("xmin", np.min)):
        assert [step for step, _ in logger.values(name)] == list(range(1, 13))
        np.testing.assert_allclose([value for _, value in logger.values(name)],
                                   [float(reduce(bx)) for bx, _ in batches] * 2, rtol=1e-5)
    last_min = float(batches[-1][0].min())
    assert trainer.callback_metrics["xmin"] == pytest.approx(last_min, rel=1e-6)
    # A second fit clears the buffers: before its first step they report nothing, so callbacks
    # still see the last values of the first fit (not the cleared buffers' zeros).
    trainer.max_epochs = 3
    trainer.fit(fresh_model(cls=StepStatistics), batches)
    assert seen.metrics[2]["xmin"] == pytest.approx(last_min, rel=1e-6)


@pytest.mark.parametrize("sink_size", [1, 2])
def test_a_name_logged_twice_a_step_reports_the_mean_of_its_records(sink_size):
    batches = batches_of(*make_data(40), 8)
    trainer, logger = fit_with_step_logger(LoggedTwice, batches, max_epochs=1, sink_size=sink_size)
    np.testing.assert_allclose([value for _, value in logger.values("x")],
                               [(bx.sum() + bx.max()) / 2 for bx, _ in batches], rtol=1e-5)


class LogsEvenBatches(TinyRegressor):
    """Logs a name only on even batches: a condition on a device tensor inside the compiled step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("xsum", x.sum())
        if batch_idx % 2 == 0:
            self.log("even", x.sum())
        return ((self(x) - y) ** 2).mean()


@pytest.mark.parametrize("sink_size", [1, 2])
def test_a_name_logged_under_a_condition_is_reported_only_at_the_steps_that_log_it(sink_size):
    batches = batches_of(*make_data(48), 8)
    trainer, logger = fit_with_step_logger(LogsEvenBatches, batches, max_epochs=1, sink_size=sink_size)
    assert logger.values("even") == [(step, pytest.approx(float(batches[step - 1][0].sum()), rel=1e-5))
                                      for step in (1, 3, 5)]
    assert len(logger.values("xsum")) == 6


class StepsAfterBatches(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_step_values_under_loss_scaling_come_from_the_micro_batch_that_stepped():
    x, y = make_data(48)
    batches = batches_of(x, y, 8)
    batches[2] = (batches[2][0].copy(), batches[2][1])
    batches[2][0][3, 1] = np.inf  # its gradients overflow: the step is skipped, the scale drops

    def fit(sink_size, *callbacks):
        trainer, logger = fit_with_step_logger(StepStatistics, batches, max_epochs=1, sink_size=sink_size,
                                               precision="16-mixed", callbacks=list(callbacks))
        return trainer, logger

    seen = StepsAfterBatches()
    per_step, logger = fit(1, seen)
    assert per_step.global_step < 6  # at least one skipped step
    # the value of step s is that of the micro-batch that took the run to step s
    expected = {step: float(batches[i][0].max()) for i, step in enumerate(seen.steps)
                if step != ([0] + seen.steps)[i]}
    assert sorted(expected) == list(range(1, per_step.global_step + 1))
    for run_logger in (logger, fit(3)[1]):  # sunk: the history rows of skipped steps are written over
        assert [step for step, _ in run_logger.values("xmax")] == sorted(expected)
        np.testing.assert_allclose([v for _, v in run_logger.values("xmax")], [expected[s] for s in sorted(expected)],
                                   rtol=1e-3)  # float16


def test_step_values_reach_callbacks_when_sunk_without_a_logger():
    x, y = make_data(40)
    batches = batches_of(x, y, 8)
    trainer = quiet_trainer(max_epochs=1, sink_size=3)
    trainer.fit(fresh_model(cls=StepStatistics), batches)
    assert trainer._metrics.device["train"].history is None  # no logger: no step history is kept
    assert trainer.callback_metrics["xmean"] == pytest.approx(float(batches[-1][0].mean()), rel=1e-5)
