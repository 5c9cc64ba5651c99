"""Trainer arguments: each bad value is refused with an error naming the argument."""

import pytest

import lightms
from lightms.callbacks import TQDMProgressBar
from conftest import batches_of, fresh_model, make_data, quiet_trainer


@pytest.mark.parametrize("kwargs,error,text", [
    ({"accumulate": 0}, ValueError, "accumulate"),
    ({"accumulate": 2.0}, TypeError, "accumulate"),
    ({"accumulate": True}, TypeError, "accumulate"),
    ({"max_epochs": -2}, ValueError, "max_epochs"),
    ({"max_steps": "10"}, TypeError, "max_steps"),
    ({"limit_train_batches": 1.5}, ValueError, "limit_train_batches"),
    ({"limit_val_batches": -1}, ValueError, "limit_val_batches"),
    ({"val_check_interval": 0.0}, ValueError, "val_check_interval"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ({"gradient_clip_val": -1.0}, ValueError, "gradient_clip_val"),
    ({"gradient_clip_algorithm": "l2"}, ValueError, "gradient_clip_algorithm"),
    ({"compile": "yes"}, TypeError, "compile"),
    ({"seed": -1}, ValueError, "seed"),
    ({"callbacks": [object()]}, TypeError, "callbacks"),
    ({"logger": "tensorboard"}, TypeError, "logger"),
    ({"default_root_dir": 3}, TypeError, "default_root_dir"),
    ({"fast_dev_run": -1}, ValueError, "fast_dev_run"),
    ({"check_val_every_n_epoch": None}, ValueError, "check_val_every_n_epoch"),
])
def test_bad_trainer_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        lightms.Trainer(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        lightms.Trainer(10)


def test_mutually_exclusive_arguments():
    with pytest.raises(ValueError, match="enable_progress_bar=False"):
        lightms.Trainer(enable_progress_bar=False, callbacks=[TQDMProgressBar()])
    x, y = make_data(8)

    class Data(lightms.LightningDataModule):
        def train_dataloader(self):
            return batches_of(x, y, 4)

    with pytest.raises(ValueError, match="either a datamodule or"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), batches_of(x, y, 4), datamodule=Data())


def test_fit_needs_a_lightning_cell():
    from mindspore import nn

    with pytest.raises(TypeError, match="LightningCell"):
        quiet_trainer(max_epochs=1).fit(nn.Dense(2, 2), [])
