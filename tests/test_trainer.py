"""The fit loop: step counting, validation schedule, hooks, recompilation and host syncs."""

import os

import numpy as np
import pytest

import lightms
from lightms.callbacks import Callback
from conftest import (RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, parameters_of,
                      quiet_trainer)


class BatchCounter(Callback):
    def __init__(self):
        self.train_batches = 0
        self.val_runs = []  # global_step at each validation end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_batches += 1

    def on_validation_end(self, trainer, module):
        self.val_runs.append(trainer.global_step)


@pytest.mark.parametrize("batches,accumulate,expected", [(10, 4, 3), (8, 4, 2), (5, 1, 5), (3, 5, 1)])
def test_global_step_is_ceil_of_batches_over_accumulate(batches, accumulate, expected):
    x, y = make_data(batches * 4)
    trainer = quiet_trainer(max_epochs=2, accumulate=accumulate)
    trainer.fit(fresh_model(), batches_of(x, y, 4))
    assert trainer.global_step == 2 * expected
    assert trainer.current_epoch == 2
    assert trainer.estimated_stepping_batches == 2 * expected


def test_max_steps_counts_optimizer_steps():
    x, y = make_data(40)
    counter = BatchCounter()
    trainer = quiet_trainer(max_steps=3, accumulate=2, callbacks=[counter])
    trainer.fit(fresh_model(), batches_of(x, y, 4))  # 10 batches, 5 steps per epoch
    assert trainer.global_step == 3
    assert counter.train_batches == 6
    assert trainer.max_epochs == -1  # Lightning's default when max_steps is set


def test_max_epochs_defaults_to_1000_without_max_steps():
    assert lightms.Trainer(logger=False, enable_progress_bar=False).max_epochs == 1000


def test_log_every_n_steps_counts_optimizer_steps():
    x, y = make_data(64)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=1, accumulate=2, log_every_n_steps=2, logger=logger)
    trainer.fit(fresh_model(), batches_of(x, y, 4))  # 16 batches -> 8 steps
    assert [step for step, _ in logger.values("loss")] == [2, 4, 6, 8]


def test_int_val_check_interval_counts_optimizer_steps():
    x, y = make_data(64)
    counter = BatchCounter()
    trainer = quiet_trainer(max_epochs=2, accumulate=2, val_check_interval=3, check_val_every_n_epoch=None,
                            callbacks=[counter])
    trainer.fit(fresh_model(), batches_of(x, y, 4), batches_of(x, y, 16))  # 8 steps per epoch
    assert counter.val_runs == [3, 6, 9, 12, 15]


def test_validation_every_epoch_and_fraction():
    x, y = make_data(32)
    counter = BatchCounter()
    quiet_trainer(max_epochs=2, val_check_interval=0.5, callbacks=[counter]).fit(
        fresh_model(), batches_of(x, y, 4), batches_of(x, y, 16))
    assert counter.val_runs == [4, 8, 12, 16]
    counter = BatchCounter()
    quiet_trainer(max_epochs=4, check_val_every_n_epoch=2, callbacks=[counter]).fit(
        fresh_model(), batches_of(x, y, 4), batches_of(x, y, 16))
    assert counter.val_runs == [16, 32]


def test_no_recompilation_after_first_epoch_with_a_smaller_last_batch():
    x, y = make_data(100)
    counts = []

    class CountCompiles(Callback):
        def on_train_epoch_end(self, trainer, module):
            counts.append(lightms.compiled_graph_count())

    quiet_trainer(max_epochs=4, accumulate=2, callbacks=[CountCompiles()]).fit(
        fresh_model(), batches_of(x, y, 16), batches_of(x, y, 30))  # last batches of 4 and 10
    assert counts[0] > 0
    assert counts[1:] == [counts[0]] * 3


def test_no_host_sync_on_steps_nobody_listens_to():
    # With no logger and no progress bar, reads happen only at epoch ends: the count must not
    # grow with the number of steps.
    def syncs(batches):
        x, y = make_data(batches * 4)
        trainer = quiet_trainer(max_epochs=2)
        trainer.fit(fresh_model(), batches_of(x, y, 4))
        return trainer.host_sync_count

    few, many = syncs(3), syncs(30)
    assert few == many
    assert few <= 6  # per epoch at most: step values, epoch values, the device's sum of the losses


class EpochLogger(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss, on_epoch=True)
        return loss


@pytest.mark.parametrize("cls, epoch_reads", [(TinyRegressor, 0), (EpochLogger, 1)])
def test_host_syncs_only_at_logging_steps(cls, epoch_reads):
    x, y = make_data(30 * 4)
    trainer = quiet_trainer(max_epochs=1, log_every_n_steps=10, logger=RecordingLogger())
    trainer.fit(fresh_model(cls=cls), batches_of(x, y, 4))
    # 3 logging steps (10, 20, 30; step 30's values are also the epoch-end step read), 1 read of the
    # device's loss sum (non-finite check) at the epoch end, and 1 epoch read only if a logged name has on_epoch
    assert trainer.host_sync_count == 4 + epoch_reads


class HookRecorder(TinyRegressor):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "calls", [])

    def _record(self, name):
        self.calls.append(name)


_HOOKS = ["setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_batch_start",
          "on_train_batch_end", "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
          "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end", "on_train_epoch_end",
          "on_train_end", "on_fit_end", "teardown"]


def _make_recording_hook(name):
    def hook(self, *args):
        self.calls.append(name)
    return hook


for _name in _HOOKS:
    setattr(HookRecorder, _name, _make_recording_hook(_name))


def test_module_hook_order_matches_lightning():
    x, y = make_data(8)
    model = fresh_model(cls=HookRecorder)
    quiet_trainer(max_epochs=1, num_sanity_val_steps=1).fit(model, batches_of(x, y, 4), batches_of(x, y, 8))
    assert model.calls == [
        "setup", "on_fit_start",
        # sanity check: one validation batch
        "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
        "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
        "on_train_start", "on_train_epoch_start",
        "on_train_batch_start", "on_train_batch_end", "on_train_batch_start", "on_train_batch_end",
        "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
        "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
        "on_train_epoch_end", "on_train_end", "on_fit_end", "teardown",
    ]


def test_validate_test_predict_return_values():
    import mindspore as ms

    class Full(TinyRegressor):
        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_mae", (self(x) - y).abs().mean())

    x, y = make_data(40)
    model = fresh_model(cls=Full)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, batches_of(x, y, 8))
    predictions = trainer.predict(model, batches_of(x, y, 16))
    assert [tuple(p.shape) for p in predictions] == [(16, 1), (16, 1), (8, 1)]
    expected = model.net(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(np.concatenate([p.asnumpy() for p in predictions]), expected, atol=1e-6)
    val = trainer.validate(model, batches_of(x, y, 16))
    test = trainer.test(model, batches_of(x, y, 16))
    assert val[0]["val_loss"] == pytest.approx(float(((expected - y) ** 2).mean()), rel=1e-5)
    assert test[0]["test_mae"] == pytest.approx(float(np.abs(expected - y).mean()), rel=1e-5)
    assert list(val[0]) == ["val_loss"] and list(test[0]) == ["test_mae"]


def test_datamodule_is_set_up_and_used():
    calls = []
    x, y = make_data(32)

    class Data(lightms.LightningDataModule):
        def prepare_data(self):
            calls.append("prepare_data")

        def setup(self, stage):
            calls.append(f"setup:{stage}")

        def train_dataloader(self):
            return batches_of(x, y, 8)

        def val_dataloader(self):
            return batches_of(x, y, 16)

    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(fresh_model(), datamodule=Data())
    assert calls == ["prepare_data", "setup:fit"]
    assert trainer.global_step == 4 and "val_loss" in trainer.callback_metrics


def test_mindspore_dataset_input_and_dict_batches():
    from mindspore import dataset as msds

    x, y = make_data(50)
    dataset = msds.NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(16)
    by_dataset = fresh_model()
    quiet_trainer(max_epochs=1).fit(by_dataset, dataset)

    class DictModel(TinyRegressor):
        def training_step(self, batch, batch_idx):
            return ((self(batch["x"]) - batch["y"]) ** 2).mean()

    by_dict = fresh_model(cls=DictModel)
    quiet_trainer(max_epochs=1).fit(by_dict, [{"x": bx, "y": by} for bx, by in batches_of(x, y, 16)])
    for name, value in parameters_of(by_dataset).items():
        np.testing.assert_allclose(value, parameters_of(by_dict)[name], atol=1e-6)


def test_fast_dev_run_runs_one_batch_of_each():
    x, y = make_data(40)
    counter = BatchCounter()
    trainer = lightms.Trainer(fast_dev_run=True, enable_progress_bar=False, callbacks=[counter])
    trainer.fit(fresh_model(), batches_of(x, y, 4), batches_of(x, y, 4))
    assert trainer.global_step == 1 and counter.train_batches == 1 and counter.val_runs == [1]
    assert trainer.loggers == []


def test_should_stop_ends_fit_after_the_current_step():
    class StopAt(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                trainer.should_stop = True

    x, y = make_data(40)
    trainer = quiet_trainer(max_epochs=5, callbacks=[StopAt()])
    trainer.fit(fresh_model(), batches_of(x, y, 4))
    assert trainer.global_step == 2


class ProgressBarLoss(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss


@pytest.mark.parametrize("sink_size", [1, 3])
def test_the_progress_bar_reads_the_device_only_when_a_name_is_shown_on_it(sink_size, capsys):
    # A bar that redraws after every batch reads the step values at each redraw when a name has
    # prog_bar=True, and never when none has: it then listens to nothing.
    from lightms.callbacks import TQDMProgressBar

    def syncs(cls, bar):
        x, y = make_data(12 * 4)
        trainer = quiet_trainer(max_epochs=1, sink_size=sink_size, enable_progress_bar=bar,
                                callbacks=[TQDMProgressBar(mininterval=0.0)] if bar else [])
        trainer.fit(fresh_model(cls=cls), batches_of(x, y, 4))
        return trainer.host_sync_count, trainer.progress_bar_metrics

    without_bar, _ = syncs(TinyRegressor, bar=False)
    assert syncs(TinyRegressor, bar=True) == (without_bar, {})
    shown_syncs, shown = syncs(ProgressBarLoss, bar=True)
    assert shown_syncs >= without_bar + 12 // sink_size - 1 and set(shown) == {"loss"}
    assert "loss=" in capsys.readouterr().out


def test_importing_mindspore_first_leaves_a_fit_quiet(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(
        "import mindspore\n"  # before lightms: GLOG_v is MindSpore's default, so its warnings print
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from conftest import TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer\n"
        "x, y = make_data(32)\n"
        "quiet_trainer(max_epochs=1, accumulate=2).fit(fresh_model(), batches_of(x, y, 8))\n"
        "quiet_trainer(max_epochs=1, sink_size=2).fit(fresh_model(), batches_of(x, y, 8))\n"
        "print('done')\n")
    environment = {key: value for key, value in os.environ.items() if key != "GLOG_v"}  # lightms set it here
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=environment)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
    assert "WARNING" not in run.stderr, run.stderr
