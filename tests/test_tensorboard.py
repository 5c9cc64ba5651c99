"""TensorBoardLogger: event files read back with TensorBoard's own reader."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightms.loggers import TensorBoardLogger
from conftest import TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer


class LogsInputMean(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("xmean", x.mean())
        return ((self(x) - y) ** 2).mean()


def test_scalars_read_back_with_tensorboard(tmp_path):
    x, y = make_data(40)
    batches = batches_of(x, y, 8)
    logger = TensorBoardLogger(str(tmp_path), name="runs")
    trainer = quiet_trainer(max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(fresh_model(cls=LogsInputMean, lr=0.05), batches, batches)
    assert logger.log_dir == os.path.join(str(tmp_path), "runs", "version_0")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"xmean", "val_loss", "epoch"} <= set(events.Tags()["scalars"])
    xmean = [(e.step, e.value) for e in events.Scalars("xmean")]
    expected = [float(bx.mean()) for bx, _ in batches] * 2
    assert [s for s, _ in xmean] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in xmean], expected, rtol=1e-5)
    val = events.Scalars("val_loss")
    assert [e.step for e in val] == [5, 10]
    assert val[-1].value == pytest.approx(trainer.callback_metrics["val_loss"], rel=1e-6)
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as handle:
        assert handle.read() == "lr: 0.05\n"
    # A second logger in the same place picks the next version.
    assert TensorBoardLogger(str(tmp_path), name="runs").version == 1


def test_default_logger_writes_under_default_root_dir(tmp_path):
    import lightms

    x, y = make_data(16)
    trainer = lightms.Trainer(max_epochs=1, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(fresh_model(), batches_of(x, y, 8))
    assert trainer.log_dir == os.path.join(str(tmp_path), "lightning_logs", "version_0")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(trainer.log_dir))


def test_hparams_plugin_and_progress_bar_reads_only_at_refresh(tmp_path, capsys):
    import lightms
    from lightms.callbacks import TQDMProgressBar

    x, y = make_data(30 * 4)
    logger = TensorBoardLogger(str(tmp_path))
    # a bar that never redraws within the run reads the device only when it closes the epoch
    bar = TQDMProgressBar(mininterval=3600.0)
    trainer = lightms.Trainer(max_epochs=1, logger=logger, callbacks=[bar], log_every_n_steps=1000,
                              enable_checkpointing=False)
    trainer.fit(fresh_model(cls=LogsInputMean, lr=0.05), batches_of(x, y, 4))
    assert trainer.host_sync_count <= 4  # one bar read + step, epoch and non-finite reads at the epoch end
    out = capsys.readouterr().out
    assert "Epoch 0: 100%" in out and "30/30" in out
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    raw = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    assert start.hparams["lr"].number_value == 0.05
