"""SIGTERM / Ctrl-C during fit, and non-finite losses."""

import os
import signal

import numpy as np
import pytest

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
    # the inf in batch 2 makes the weights NaN, so batch 3's loss is NaN too
    with pytest.warns(UserWarning, match="NaN or infinite in 2 micro-batch"):
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
    assert trainer.global_step == 4


@pytest.mark.parametrize("sink_size", [1, 3, "epoch"])
@pytest.mark.parametrize("accumulate, expected", [(1, 2), (2, 1)])
def test_nonfinite_losses_are_counted_per_micro_batch_with_and_without_sinking(sink_size, accumulate, expected):
    # accumulate=1: batch 2's loss is inf and batch 3's NaN (weights updated from batch 2).
    # accumulate=2: batches 2 and 3 share a window, so the weights turn NaN only after both.
    # sink_size=3: chunks [0, 1, 2] and [3]; the second chunk's unused rows still hold the first's losses.
    with pytest.warns(UserWarning, match=f"NaN or infinite in {expected} micro-batch"):
        trainer = quiet_trainer(max_epochs=1, sink_size=sink_size, accumulate=accumulate)
        trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
    assert trainer.global_step == 4 // accumulate


def test_every_fit_of_one_trainer_warns_about_its_own_nonfinite_losses():
    trainer = quiet_trainer(max_epochs=1)
    for epochs in (1, 2):  # the second fit goes on for one more epoch, with fresh device counters
        trainer.max_epochs = epochs
        with pytest.warns(UserWarning, match="NaN or infinite in 2 micro-batch"):
            trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
    assert trainer.global_step == 8


def test_detect_anomaly_stops_at_the_step():
    trainer = quiet_trainer(max_epochs=1, detect_anomaly=True)
    with pytest.raises(FloatingPointError, match="at optimizer step 3 \\(epoch 0, batch 2\\).*'loss': inf"):
        trainer.fit(fresh_model(cls=PoisonedBatch), _poisoned_data())
