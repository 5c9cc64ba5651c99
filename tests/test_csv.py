"""CSVLogger: rows and columns match what the model logged."""

import csv
import os

import numpy as np
import pytest

from lightms.loggers import CSVLogger, TensorBoardLogger
from conftest import batches_of, fresh_model, make_data, quiet_trainer
from test_tensorboard import LogsInputMean


def test_metrics_csv_and_hparams(tmp_path):
    x, y = make_data(24)
    batches = batches_of(x, y, 8)
    csv_logger = CSVLogger(str(tmp_path))
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(max_epochs=1, log_every_n_steps=1, logger=[csv_logger, tb_logger])
    trainer.fit(fresh_model(cls=LogsInputMean, lr=0.2), batches, batches)
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    xmean = [(int(r["step"]), float(r["xmean"])) for r in rows if r["xmean"]]
    assert [s for s, _ in xmean] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in xmean], [bx.mean() for bx, _ in batches], rtol=1e-5, atol=1e-7)
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert val == [pytest.approx(trainer.callback_metrics["val_loss"], rel=1e-6)]
    with open(os.path.join(csv_logger.log_dir, "hparams.yaml")) as handle:
        assert handle.read() == "lr: 0.2\n"
    assert os.listdir(tb_logger.log_dir)  # both loggers of the list were written


def test_logging_into_an_existing_version_keeps_its_files(tmp_path):
    x, y = make_data(16)
    batches = batches_of(x, y, 8)

    def run(lr, max_epochs):
        logger = CSVLogger(str(tmp_path), version=0)
        quiet_trainer(max_epochs=max_epochs, log_every_n_steps=1, logger=logger).fit(
            fresh_model(cls=LogsInputMean, lr=lr), batches)
        return logger.log_dir

    folder = run(0.2, 1)
    run(0.2, 1)  # the same hyperparameters: hparams.yaml stays as it is
    run(0.5, 1)  # other hyperparameters: written beside it
    with open(os.path.join(folder, "metrics.csv")) as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["xmean"]]
    assert steps == [1, 2] * 3  # every run's rows, in order
    assert sorted(os.listdir(folder)) == ["hparams-v1.yaml", "hparams.yaml", "metrics.csv"]
    assert open(os.path.join(folder, "hparams.yaml")).read() == "lr: 0.2\n"
    assert open(os.path.join(folder, "hparams-v1.yaml")).read() == "lr: 0.5\n"
