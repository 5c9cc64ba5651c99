"""SIGTERM / Ctrl-C during fit, and non-finite losses."""

import os
import signal

import numpy as np
import pytest

from mindspore import nn

from lightms.callbacks import Callback, ModelCheckpoint
from conftest import (AdamRegressor, RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, parameters_of,
                      quiet_trainer)


class SignalAt(Callback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.state.window == 0:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, signum, capsys):
    x, y = make_data(64)
    batches = batches_of(x, y, 8)

    def trainer(*callbacks, **kwargs):
        return quiet_trainer(max_epochs=2, accumulate=2, enable_checkpointing=True,
                             callbacks=[ModelCheckpoint(dirpath=str(tmp_path / f"c{len(os.listdir(tmp_path))}"))]
                             + list(callbacks), **kwargs)

    straight = fresh_model(cls=AdamRegressor)
    trainer().fit(straight, batches)
    logger = RecordingLogger()
    interrupted = fresh_model(cls=AdamRegressor)
    victim = trainer(SignalAt(3, signum), logger=logger)
    with pytest.raises(SystemExit) as exit_info:
        victim.fit(interrupted, batches)
    # MindSpore turns SIGINT into SIGTERM once it has run a graph: either code is a clean exit
    assert exit_info.value.code in (128 + signal.SIGINT, 128 + signal.SIGTERM)
    assert victim.interrupted
    assert logger.status == "interrupted"  # the loggers were closed
    assert victim.global_step == 3  # finished the current step, then stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    message = capsys.readouterr().err
    path = os.path.join(victim.checkpoint_callback.dirpath, "interrupted-epoch=0-step=3.ckpt")
    assert path in message and os.path.exists(path)
    resumed = fresh_model(cls=AdamRegressor)
    trainer().fit(resumed, batches, ckpt_path=path)
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)


class PoisonedBatch(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss)
        return loss


def _poisoned_data():
    x, y = make_data(32)
    y = y.copy()
    y[20] = np.inf  # batch 2 of 4 (batches of 8)
    return batches_of(x, y, 8)


def test_nonfinite_loss_warns_once_by_default():
    # the inf in batch 2 makes the weights NaN, so batch 3's loss is NaN too: one warning
    with pytest.warns(UserWarning, match="NaN or infinite in epoch 0") as caught:
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
    assert trainer.global_step == 4
    assert sum("NaN or infinite" in str(w.message) for w in caught) == 1


class PoisonedFromEpoch:
    """Batches of 8 whose targets hold an inf from pass `epoch` on (in batch 2 of 4)."""

    def __init__(self, epoch):
        self.epoch, self.passes = epoch, 0
        self.clean, self.poisoned = batches_of(*make_data(32), 8), _poisoned_data()

    def __len__(self):
        return 4

    def __iter__(self):
        self.passes += 1
        return iter(self.poisoned if self.passes > self.epoch else self.clean)


@pytest.mark.parametrize("sink_size", [1, 3, "epoch"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_nonfinite_loss_warning_names_the_first_epoch_with_one_with_and_without_sinking(sink_size, accumulate):
    # sink_size=3: chunks [0, 1, 2] and [3], the second padded with rows of the first (never run)
    with pytest.warns(UserWarning, match="NaN or infinite in epoch 1") as caught:
        trainer = quiet_trainer(max_epochs=3, sink_size=sink_size, accumulate=accumulate)
        trainer.fit(fresh_model(cls=PoisonedBatch), PoisonedFromEpoch(1))
    assert sum("NaN or infinite" in str(w.message) for w in caught) == 1  # once per fit, not per epoch
    assert trainer.global_step == 3 * 4 // accumulate


class LossesSeen(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"].asnumpy()))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_device_loss_sum_adds_every_micro_batch_loss_once(accumulate):
    x, y = make_data(40)
    seen = LossesSeen()
    per_step = quiet_trainer(max_epochs=2, accumulate=accumulate, callbacks=[seen])
    per_step.fit(fresh_model(), batches_of(x, y, 8))
    assert len(seen.losses) == 10
    assert float(per_step._counters.loss_sum.asnumpy()) == pytest.approx(sum(seen.losses), rel=1e-6)
    # sunk chunks of 3 and 2 (padded to 3): the padding rows are not run, so not added
    sunk = quiet_trainer(max_epochs=2, accumulate=accumulate, sink_size=3)
    sunk.fit(fresh_model(), batches_of(x, y, 8))
    assert float(sunk._counters.loss_sum.asnumpy()) == pytest.approx(sum(seen.losses), rel=1e-5)


def test_every_fit_of_one_trainer_warns_about_its_own_nonfinite_losses():
    trainer = quiet_trainer(max_epochs=1)
    for epochs in (1, 2):  # the second fit goes on for one more epoch, with a fresh device loss sum
        trainer.max_epochs = epochs
        with pytest.warns(UserWarning, match=f"NaN or infinite in epoch {epochs - 1}"):  # the epoch this fit ran
            trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
    assert trainer.global_step == 8


def test_detect_anomaly_stops_at_the_step():
    trainer = quiet_trainer(max_epochs=1, detect_anomaly=True)
    with pytest.raises(FloatingPointError, match="at optimizer step 3 \\(epoch 0, batch 2\\).*'loss': inf"):
        trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())


class SignalIn(Callback):
    """Sends `signum` to this process once, in `hook`, after `after` optimizer steps (validation: not the sanity check)."""

    def __init__(self, hook, after, signum=signal.SIGTERM):
        self.hook, self.after, self.signum, self.sent = hook, after, signum, False

    def _maybe(self, trainer):
        if not self.sent and not trainer.sanity_checking and trainer.global_step >= self.after:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, module, *args):
        if self.hook == "validation":
            self._maybe(trainer)

    def on_train_end(self, trainer, module):
        if self.hook == "on_train_end":
            self._maybe(trainer)


@pytest.mark.parametrize("hook", ["validation", "on_train_end"])
def test_a_signal_after_the_last_training_step_still_stops_fit_with_a_checkpoint(tmp_path, hook, capsys):
    x, y = make_data(32)
    batches = batches_of(x, y, 8)
    straight = fresh_model(cls=AdamRegressor)
    quiet_trainer(max_epochs=2).fit(straight, batches, batches)
    victim = quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[
        ModelCheckpoint(dirpath=str(tmp_path)), SignalIn(hook, after=8)])
    with pytest.raises(SystemExit) as exit_info:
        victim.fit(fresh_model(cls=AdamRegressor), batches, batches)
    assert exit_info.value.code == 128 + signal.SIGTERM and victim.interrupted
    path = str(tmp_path / "interrupted-epoch=2-step=8.ckpt")  # after epoch 1: the loop stands at epoch 2
    assert path in capsys.readouterr().err
    resumed = fresh_model(cls=AdamRegressor)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(resumed, batches, batches, ckpt_path=path)  # nothing left to train
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)


def test_a_second_run_interrupted_at_the_same_step_does_not_overwrite_the_first_ones_checkpoint(tmp_path):
    x, y = make_data(32)
    written = []
    for _ in range(2):
        victim = quiet_trainer(max_epochs=2, enable_checkpointing=True,
                               callbacks=[ModelCheckpoint(dirpath=str(tmp_path)), SignalAt(3, signal.SIGTERM)])
        with pytest.raises(SystemExit):
            victim.fit(fresh_model(cls=AdamRegressor), batches_of(x, y, 8))
        written.append(sorted(os.listdir(tmp_path)))
    first = open(tmp_path / "interrupted-epoch=0-step=3.ckpt", "rb").read()
    assert written == [["interrupted-epoch=0-step=3.ckpt"],
                       ["interrupted-epoch=0-step=3-v1.ckpt", "interrupted-epoch=0-step=3.ckpt"]]
    assert open(tmp_path / "interrupted-epoch=0-step=3.ckpt", "rb").read() == first


class ReluRegressor(TinyRegressor):
    """TinyRegressor with a ReLU: MindSpore's ReLU maps NaN to 0, so a NaN input leaves the loss finite."""

    def __init__(self, lr=0.1):
        super().__init__(lr)
        self.net = nn.SequentialCell(nn.Dense(6, 8), nn.ReLU(), nn.Dense(8, 1))


def _nan_input_data():
    x, y = make_data(32)
    x = x.copy()
    x[9, 2] = np.nan  # batch 1 of 4
    return batches_of(x, y, 8)


def test_a_nan_input_that_leaves_the_loss_finite_is_caught_by_the_parameter_check():
    losses = LossesSeen()
    with pytest.warns(UserWarning, match=r"Parameters \['net.0.weight'\] became NaN or infinite in epoch 0 while the "
                                         "training loss stayed finite"):
        trainer = quiet_trainer(max_epochs=1, callbacks=[losses])
        trainer.fit(fresh_model(cls=ReluRegressor), _nan_input_data())
    assert np.isfinite(losses.losses).all()  # what the loss-only check saw
    assert np.isnan(trainer.model.net[0].weight.asnumpy()).any()
    with pytest.raises(FloatingPointError, match=r"parameters \['net.0.weight'\] became NaN or infinite while the "
                                                 r"training loss stayed finite .* at optimizer step 2 \(epoch 0, "
                                                 r"batch 1\)"):
        quiet_trainer(max_epochs=1, detect_anomaly=True).fit(fresh_model(cls=ReluRegressor), _nan_input_data())
