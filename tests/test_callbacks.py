"""Callbacks: hook order, EarlyStopping, LearningRateMonitor, Timer, LambdaCallback, ModelSummary."""

import os

import numpy as np
import pytest
from mindspore import nn

from lightms.callbacks import Callback, EarlyStopping, LambdaCallback, LearningRateMonitor, ModelSummary
from lightms.callbacks.timer import parse_duration
from conftest import RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer
from test_trainer import HookRecorder


class RecordingCallback(Callback):
    def __init__(self, calls, order=0):
        self.calls = calls
        self.order = order


_CALLBACK_HOOKS = [name for name in dir(Callback) if name.startswith("on_") or name in ("setup", "teardown")]
for _name in _CALLBACK_HOOKS:
    setattr(RecordingCallback, _name,
            (lambda hook: lambda self, trainer, module, *args: self.calls.append(f"cb.{hook}"))(_name))


def test_full_hook_order_of_a_small_fit_matches_lightning():
    x, y = make_data(8)
    model = fresh_model(cls=HookRecorder)
    calls = model.calls
    quiet_trainer(max_epochs=1, num_sanity_val_steps=1, callbacks=[RecordingCallback(calls)]).fit(
        model, batches_of(x, y, 4), batches_of(x, y, 8))

    def both(hook):
        return [f"cb.{hook}", hook]

    val = (both("on_validation_start") + both("on_validation_epoch_start") + both("on_validation_batch_start")
           + both("on_validation_batch_end") + both("on_validation_epoch_end") + both("on_validation_end"))
    batch = both("on_train_batch_start") + both("on_train_batch_end")
    expected = (both("setup") + both("on_fit_start")
                + ["cb.on_sanity_check_start"] + val + ["cb.on_sanity_check_end"]
                + both("on_train_start") + both("on_train_epoch_start") + batch + batch + val
                + both("on_train_epoch_end") + both("on_train_end") + both("on_fit_end") + both("teardown"))
    assert calls == expected


def test_callbacks_above_module_order_run_after_the_module_hook():
    calls = []
    x, y = make_data(4)
    model = fresh_model(cls=HookRecorder)
    object.__setattr__(model, "calls", calls)
    late, early = RecordingCallback(calls, order=Callback.MODULE_ORDER + 1), RecordingCallback(calls, order=-5)
    quiet_trainer(max_epochs=1, callbacks=[late, early]).fit(model, batches_of(x, y, 4))
    assert calls[:3] == ["cb.setup", "setup", "cb.setup"]


class ScriptedScore(TinyRegressor):
    """Logs a scripted validation score per epoch."""

    scores = [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.log("score", self.scores[self.current_epoch])


def test_early_stopping_epoch_and_zero_is_a_value():
    x, y = make_data(8)
    stopper = EarlyStopping("score", patience=2)
    trainer = quiet_trainer(max_epochs=6, callbacks=[stopper])
    trainer.fit(fresh_model(cls=ScriptedScore), batches_of(x, y, 4), batches_of(x, y, 8))
    # best 0.0 at epoch 1; epochs 2 and 3 do not improve -> stop after epoch 3
    assert stopper.best_score == 0.0
    assert trainer.current_epoch == 4 and stopper.stopped_epoch == 3
    stopper = EarlyStopping("score", stopping_threshold=0.0)
    trainer = quiet_trainer(max_epochs=6, callbacks=[stopper])
    trainer.fit(fresh_model(cls=ScriptedScore), batches_of(x, y, 4), batches_of(x, y, 8))
    assert trainer.current_epoch == 2  # 0.0 reached the threshold at epoch 1


def test_early_stopping_strict_about_missing_metric():
    x, y = make_data(8)
    with pytest.raises(KeyError, match="no such logged value"):
        quiet_trainer(max_epochs=2, callbacks=[EarlyStopping("nope")]).fit(fresh_model(), batches_of(x, y, 4))


def test_learning_rate_monitor_reads_schedules():
    class Decay(TinyRegressor):
        def configure_optimizers(self):
            schedule = nn.ExponentialDecayLR(learning_rate=0.1, decay_rate=0.5, decay_steps=1)
            return nn.SGD(self.trainable_params(), learning_rate=schedule)

    x, y = make_data(32)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=1, accumulate=2, log_every_n_steps=1, logger=logger,
                            callbacks=[LearningRateMonitor()])
    trainer.fit(fresh_model(cls=Decay), batches_of(x, y, 4))  # 8 batches -> 4 steps
    lrs = logger.values("lr-SGD")
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in lrs], [0.1 * 0.5 ** k for k in range(4)], rtol=1e-6)


def test_timer_and_max_time_stop_after_a_step():
    assert parse_duration("00:01:00:05") == 3605.0
    assert parse_duration({"minutes": 2}) == 120.0
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        parse_duration("10 minutes")
    x, y = make_data(32)
    trainer = quiet_trainer(max_epochs=3, accumulate=2, max_time="00:00:00:00")
    trainer.fit(fresh_model(), batches_of(x, y, 4))
    assert trainer.global_step == 1  # the first window is finished, then fit ends


def test_lambda_callback_and_model_summary(capsys):
    seen = []
    x, y = make_data(8)
    callback = LambdaCallback(on_train_epoch_end=lambda trainer, module: seen.append(trainer.current_epoch))
    quiet_trainer(max_epochs=2, callbacks=[callback, ModelSummary()]).fit(fresh_model(), batches_of(x, y, 4))
    assert seen == [0, 1]
    out = capsys.readouterr().out
    assert "| net  | SequentialCell | 65" in out  # 6*8+8 + 8*1+1 = 65 parameters
    assert "65 trainable params" in out
    with pytest.raises(ValueError, match="unknown hooks"):
        LambdaCallback(on_epoch_finish=print)



@pytest.mark.parametrize("leave", [False, True])
def test_progress_bar_keeps_one_training_bar_per_fit_unless_leave(leave, monkeypatch, capsys):
    import tqdm.auto

    import lightms.callbacks.progress as progress

    opened = []

    class CountingTqdm(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            opened.append((kwargs.get("desc"), kwargs.get("leave")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(progress, "tqdm", CountingTqdm)
    x, y = make_data(24)
    bar = progress.TQDMProgressBar(mininterval=3600.0, leave=leave)
    quiet_trainer(max_epochs=3, enable_progress_bar=True, num_sanity_val_steps=1, callbacks=[bar]).fit(
        fresh_model(), batches_of(x, y, 4), batches_of(x, y, 12))
    # Lightning's default: one bar, reset and renamed each epoch; leave=True: a bar per epoch. The
    # sanity check's and the nested validation bars are not left on screen.
    training = [("Epoch 0", True), ("Epoch 1", True), ("Epoch 2", True)] if leave else [("Epoch 0", True)]
    assert [item for item in opened if item[0].startswith("Epoch")] == training
    assert opened[0] == ("Sanity checking", False) and opened.count(("Validation", False)) == 3
    segments = capsys.readouterr().out.split("\r")
    for epoch in range(3):  # each epoch ends drawn complete, under its own name
        assert any(f"Epoch {epoch}: 100%" in segment and "6/6" in segment for segment in segments)
    assert sum("Epoch 1:   0%" in segment for segment in segments) == 1 and bar._bars == {}


@pytest.mark.parametrize("sink_size, redrawn", [(1, [0, 3, 6, 7]), (4, [0, 4, 7])])
def test_progress_bar_redraws_when_a_multiple_of_refresh_rate_passes_and_ends_complete(sink_size, redrawn, capsys):
    import re

    from lightms.callbacks import TQDMProgressBar

    x, y = make_data(28)  # 7 batches: under sink_size=4 the batch hooks see batches 4 and 7
    bar = TQDMProgressBar(refresh_rate=3, mininterval=0.0)
    quiet_trainer(max_epochs=1, enable_progress_bar=True, sink_size=sink_size, callbacks=[bar]).fit(
        fresh_model(), batches_of(x, y, 4))
    shown = [int(n) for n in re.findall(r"Epoch 0: +\d+%\|[^|]*\| (\d)/7", capsys.readouterr().out)]
    assert sorted(set(shown)) == redrawn and shown[-1] == 7


class EpochLoss(TinyRegressor):
    """Logs its training loss per step and per epoch, as `train_loss_step` / `train_loss_epoch` (and `train_loss`)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("train_loss", loss, on_epoch=True)
        return loss


class EpochEndSeen(Callback):
    """Records trainer.callback_metrics[name] in on_train_epoch_end and each loss the steps returned."""

    order = 300

    def __init__(self, name):
        self.name, self.seen, self.losses = name, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"].asnumpy()))

    def on_train_epoch_end(self, trainer, module):
        self.seen.append(trainer.callback_metrics[self.name])


@pytest.mark.parametrize("validate", [False, True])
def test_an_epoch_level_training_metric_can_be_monitored(tmp_path, validate):
    from lightms.callbacks import ModelCheckpoint

    x, y = make_data(32)
    batches = batches_of(x, y, 8)
    seen = EpochEndSeen("train_loss")
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="train_loss", save_top_k=1)
    stopper = EarlyStopping("train_loss", patience=1, min_delta=10.0)  # no epoch improves by 10: stop after 2
    trainer = quiet_trainer(max_epochs=5, enable_checkpointing=True, callbacks=[checkpoint, stopper, seen])
    trainer.fit(fresh_model(cls=EpochLoss), batches, batches if validate else None)
    assert trainer.current_epoch == 2 and stopper.stopped_epoch == 1
    epoch_means = np.array(seen.losses).reshape(2, 4).mean(axis=1)  # equal batch sizes: the plain mean
    np.testing.assert_allclose(seen.seen, epoch_means, rtol=1e-5)
    assert checkpoint.best_model_score == pytest.approx(epoch_means.min(), rel=1e-5)
    assert stopper.best_score == pytest.approx(epoch_means[0], rel=1e-5)


def test_epoch_end_hooks_see_the_epochs_values_and_what_earlier_hooks_logged():
    seen = {}

    class Scored(TinyRegressor):
        def on_validation_epoch_end(self):
            seen["module"] = dict(self.trainer.callback_metrics)
            self.log("doubled", 2 * self.trainer.callback_metrics["val_loss"])

    class Reader(Callback):
        order = 300

        def on_validation_epoch_end(self, trainer, module):
            if not trainer.sanity_checking:
                seen["callback"] = dict(trainer.callback_metrics)

    x, y = make_data(16)
    quiet_trainer(max_epochs=1, callbacks=[Reader()]).fit(fresh_model(cls=Scored), batches_of(x, y, 8),
                                                           batches_of(x, y, 8))
    assert "val_loss" in seen["module"]
    assert seen["callback"]["doubled"] == pytest.approx(2 * seen["callback"]["val_loss"], rel=1e-6)


def test_missing_validation_metrics_say_why():
    from lightms.callbacks import ModelCheckpoint

    x, y = make_data(32)
    batches = batches_of(x, y, 8)  # 4 steps an epoch
    with pytest.raises(ValueError, match=r"val_check_interval=9\) validates every that many optimizer steps, but "
                                         "this fit takes 8"):
        quiet_trainer(max_epochs=2, val_check_interval=9, check_val_every_n_epoch=None).fit(
            fresh_model(), batches, batches)
    checkpoint = ModelCheckpoint(monitor="val_loss", save_top_k=1)
    trainer = quiet_trainer(max_epochs=2, val_check_interval=6, check_val_every_n_epoch=None,
                            enable_checkpointing=True, callbacks=[checkpoint])
    with pytest.warns(UserWarning, match=r"skips its top-k saves .* Validation has not run yet in this fit: it runs "
                                         r"every 6 optimizer steps \(now at step 4\)"):
        trainer.fit(fresh_model(), batches, batches)
    assert [os.path.basename(p) for p in checkpoint.best_k_models] == ["epoch=1-step=8.ckpt"]
    with pytest.raises(KeyError, match="This fit does not validate"):
        quiet_trainer(max_epochs=1, callbacks=[EarlyStopping("val_loss")]).fit(fresh_model(), batches)
