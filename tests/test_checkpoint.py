"""Checkpoints: exact resume (end of epoch and mid-epoch), top-k files, refusals, atomic writes."""

import os

import numpy as np
import pytest

import lightms
from lightms.callbacks import ModelCheckpoint
from lightms._mindspore import mindspore as ms
from mindspore import dataset as msds
from mindspore import nn
from conftest import (AdamRegressor, RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, parameters_of,
                      quiet_trainer)


def assert_same_series(got, expected, atol):
    """Compares [(step, value)] lists: the same steps, values within atol."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], atol=atol, rtol=0)


def fitted_checkpoint(tmp_path, **hparams):
    """Fits a TinyRegressor for one epoch and saves a full checkpoint; returns (model, trainer, path)."""
    x, y = make_data(16)
    model = fresh_model(**hparams)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, batches_of(x, y, 8))
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return model, trainer, path


def shuffled_dataset(x, y, batch_size=8):
    return msds.NumpySlicesDataset({"x": x, "y": y}, shuffle=True).batch(batch_size)


def run(max_epochs, callbacks=(), ckpt_path=None, accumulate=2, **kwargs):
    x, y = make_data(60)
    logger = RecordingLogger()
    model = fresh_model(cls=AdamRegressor)
    trainer = quiet_trainer(max_epochs=max_epochs, seed=7, accumulate=accumulate, logger=logger,
                            log_every_n_steps=1, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            **kwargs)
    trainer.fit(model, shuffled_dataset(x, y), ckpt_path=ckpt_path)
    return model, trainer, logger


def test_end_of_epoch_resume_is_exact(tmp_path):
    straight, straight_trainer, straight_log = run(2)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1)
    run(1, callbacks=[checkpoint])
    assert os.path.basename(checkpoint.last_model_path) == "epoch=0-step=4.ckpt"
    resumed, resumed_trainer, resumed_log = run(2, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "b"))],
                                                ckpt_path=checkpoint.last_model_path)
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)
    assert resumed_trainer.global_step == straight_trainer.global_step == 8
    assert resumed_trainer.current_epoch == 2
    # the resumed run logs exactly the second half of the straight run
    assert_same_series(resumed_log.values("loss"), straight_log.values("loss")[4:], atol=1e-6)
    assert resumed_trainer.callback_metrics["loss"] == pytest.approx(straight_trainer.callback_metrics["loss"],
                                                                     abs=1e-6)


def test_mid_epoch_resume_continues_with_the_next_unseen_batch(tmp_path):
    class LogsEpochMean(AdamRegressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.log("xsum", x.sum(), on_step=True, on_epoch=True)
            return ((self(x) - y) ** 2).mean()

    def fit(max_steps, callbacks=(), ckpt_path=None):
        x, y = make_data(60)
        logger = RecordingLogger()
        model = fresh_model(cls=LogsEpochMean)
        trainer = quiet_trainer(max_epochs=2, max_steps=max_steps, seed=7, accumulate=2, logger=logger,
                                log_every_n_steps=1, enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        trainer.fit(model, shuffled_dataset(x, y), ckpt_path=ckpt_path)
        return model, trainer, logger

    straight, straight_trainer, straight_log = fit(-1)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1)
    fit(-1, callbacks=[checkpoint])
    mid = os.path.join(str(tmp_path), "epoch=0-step=3.ckpt")  # 8 batches per epoch: step 3 is mid-epoch
    assert os.path.exists(mid)
    resumed, resumed_trainer, resumed_log = fit(-1, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "b"))],
                                                ckpt_path=mid)
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)
    assert_same_series(resumed_log.values("xsum_step"), straight_log.values("xsum_step")[3:], atol=1e-5)
    # the epoch value of the interrupted epoch includes the batches trained before the checkpoint
    assert_same_series(resumed_log.values("xsum_epoch"), straight_log.values("xsum_epoch"), atol=1e-5)


def test_top_k_files_best_and_last(tmp_path):
    class ScoresByEpoch(TinyRegressor):
        def validation_step(self, batch, batch_idx):
            # a made-up score per epoch: 3, 1, 4, 2 -> best (min) are epochs 1 and 3
            self.log("score", batch[0].sum() * 0 + [3.0, 1.0, 4.0, 2.0][0])

        def on_validation_epoch_end(self):
            self.log("val_score", [3.0, 1.0, 4.0, 2.0][self.current_epoch])

    x, y = make_data(16)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}-{val_score:.1f}", monitor="val_score",
                                 save_top_k=2, save_last=True)
    trainer = quiet_trainer(max_epochs=4, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(fresh_model(cls=ScoresByEpoch), batches_of(x, y, 8), batches_of(x, y, 8))
    assert sorted(os.listdir(tmp_path)) == ["epoch=1-val_score=1.0.ckpt", "epoch=3-val_score=2.0.ckpt", "last.ckpt"]
    assert checkpoint.best_model_path == os.path.join(str(tmp_path), "epoch=1-val_score=1.0.ckpt")
    assert checkpoint.best_model_score == 1.0
    assert set(checkpoint.best_k_models.values()) == {1.0, 2.0}
    assert checkpoint.last_model_path == os.path.join(str(tmp_path), "last.ckpt")


def test_plain_mindspore_loads_the_weights_and_load_from_checkpoint_rebuilds(tmp_path):
    model, trainer, path = fitted_checkpoint(tmp_path, lr=0.05)
    plain = TinyRegressor()
    not_loaded, _ = ms.load_param_into_net(plain, ms.load_checkpoint(path))
    assert not_loaded == []
    np.testing.assert_array_equal(plain.net[0].weight.asnumpy(), model.net[0].weight.asnumpy())
    rebuilt = TinyRegressor.load_from_checkpoint(path)
    assert rebuilt.hparams.lr == 0.05
    np.testing.assert_array_equal(rebuilt.net[2].weight.asnumpy(), model.net[2].weight.asnumpy())
    assert TinyRegressor.load_from_checkpoint(path, lr=0.5).hparams.lr == 0.5


def test_mismatched_and_corrupt_checkpoints_are_refused(tmp_path):
    _, trainer, path = fitted_checkpoint(tmp_path)
    x, y = make_data(16)

    class Wider(TinyRegressor):
        def __init__(self, lr=0.1):
            super().__init__(lr)
            self.net = nn.SequentialCell(nn.Dense(6, 9), nn.Tanh(), nn.Dense(9, 1))
            self.extra = nn.Dense(1, 1)

    with pytest.raises(ValueError) as error:
        Wider.load_from_checkpoint(path)
    message = str(error.value)
    assert "missing from the checkpoint: ['extra.bias', 'extra.weight']" in message
    assert "net.0.weight: checkpoint (8, 6) vs model (9, 6)" in message
    with pytest.raises(ValueError, match="does not fit this model"):
        quiet_trainer(max_epochs=2).fit(fresh_model(cls=Wider), batches_of(x, y, 8), ckpt_path=path)
    data = open(path, "rb").read()
    truncated = str(tmp_path / "truncated.ckpt")
    with open(truncated, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TinyRegressor.load_from_checkpoint(truncated)
    trainer.save_checkpoint(str(tmp_path / "weights.ckpt"), weights_only=True)
    with pytest.raises(ValueError, match="weights only"):
        quiet_trainer(max_epochs=2).fit(fresh_model(), batches_of(x, y, 8), ckpt_path=str(tmp_path / "weights.ckpt"))


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import lightms.checkpoint.io as io

    _, trainer, path = fitted_checkpoint(tmp_path)
    before = open(path, "rb").read()

    def crash(entries, filename, **kwargs):
        with open(filename[:-len(".ckpt")] + ".tmp", "wb") as handle:  # where MindSpore writes first
            handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ms, "save_checkpoint", crash)
    with pytest.raises(OSError, match="Could not write the checkpoint .*model.ckpt .No space left on device.; any "
                                      "earlier file at that path is unchanged"):
        trainer.save_checkpoint(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no temporary file left behind


def test_existing_files_are_not_overwritten_by_a_new_run(tmp_path):
    x, y = make_data(16)
    for _ in range(2):
        trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True,
                                callbacks=[ModelCheckpoint(dirpath=str(tmp_path))])
        trainer.fit(fresh_model(), batches_of(x, y, 8))
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2-v1.ckpt", "epoch=0-step=2.ckpt"]


def test_default_checkpoint_goes_under_the_logger_folder(tmp_path):
    x, y = make_data(16)
    trainer = lightms.Trainer(max_epochs=2, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(fresh_model(), batches_of(x, y, 8))
    folder = os.path.join(trainer.log_dir, "checkpoints")
    assert os.listdir(folder) == ["epoch=1-step=4.ckpt"]  # save_top_k=1 keeps the latest


def test_resume_restores_host_scheduler_state(tmp_path):
    from mindspore.experimental import optim

    class Scheduled(TinyRegressor):
        def configure_optimizers(self):
            opt = optim.Adam(self.trainable_params(), lr=0.05)
            sched = optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fit(max_epochs, callbacks=(), ckpt_path=None):
        x, y = make_data(48)
        model = fresh_model(cls=Scheduled)
        trainer = quiet_trainer(max_epochs=max_epochs, seed=3, enable_checkpointing=bool(callbacks),
                                callbacks=list(callbacks))
        trainer.fit(model, shuffled_dataset(x, y), ckpt_path=ckpt_path)
        return model, trainer

    straight, straight_trainer = fit(2)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))
    fit(1, callbacks=[checkpoint])
    resumed, resumed_trainer = fit(2, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "b"))],
                                   ckpt_path=checkpoint.last_model_path)
    lr = [float(t.optimizers[0].param_groups[0]["lr"].asnumpy()) for t in (straight_trainer, resumed_trainer)]
    assert lr[0] == pytest.approx(0.05 * 0.5 ** 6) and lr[1] == pytest.approx(lr[0])
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)


def test_checkpoint_inside_an_accumulation_window_and_module_hooks(tmp_path):
    path = str(tmp_path / "mid-window.ckpt")

    class Hooked(AdamRegressor):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["note"] = "saved by the module"

        def on_load_checkpoint(self, checkpoint):
            object.__setattr__(self, "loaded_note", checkpoint["note"])

    class SaveInsideWindow(lightms.callbacks.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 4:  # the second micro-batch of the third window of 3
                assert trainer.state.window == 2
                trainer.save_checkpoint(path)

    x, y = make_data(48)
    batches = batches_of(x, y, 4)  # 12 batches, accumulate=3 -> 4 steps per epoch
    straight = fresh_model(cls=Hooked)
    quiet_trainer(max_epochs=2, accumulate=3).fit(straight, batches)
    saver = fresh_model(cls=Hooked)
    quiet_trainer(max_epochs=1, accumulate=3, callbacks=[SaveInsideWindow()]).fit(saver, batches)
    resumed = fresh_model(cls=Hooked)
    trainer = quiet_trainer(max_epochs=2, accumulate=3)
    trainer.fit(resumed, batches, ckpt_path=path)
    assert resumed.loaded_note == "saved by the module"
    assert trainer.global_step == 8
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)
    # accumulate=2 cannot finish a window that already holds 2 micro-batches: a clear error before anything
    # is loaded, and the checkpoint is left as it was.
    before = os.path.getsize(path), os.path.getmtime(path)
    smaller = fresh_model(cls=Hooked)
    with pytest.raises(ValueError, match=r"inside an accumulation window holding 2 micro-batch.*accumulate=2"):
        quiet_trainer(max_epochs=2, accumulate=2).fit(smaller, batches, ckpt_path=path)
    assert (os.path.getsize(path), os.path.getmtime(path)) == before
    assert not hasattr(smaller, "loaded_note")
    # Written inside a window by 2 data-parallel workers (only rank 0's partial gradients are in it): refused
    # before any weight is copied.
    from lightms.checkpoint.io import read_checkpoint, write_checkpoint

    saved, meta = read_checkpoint(path)
    two_workers = str(tmp_path / "mid-window-2-workers.ckpt")
    write_checkpoint(two_workers, saved.items(), {**meta, "loop": {**meta["loop"], "world_size": 2}})
    untouched = fresh_model(cls=Hooked)
    weights = parameters_of(untouched)
    with pytest.raises(ValueError, match="only rank 0's were saved"):
        quiet_trainer(max_epochs=2, accumulate=3).fit(untouched, batches, ckpt_path=two_workers)
    for name, value in weights.items():
        np.testing.assert_array_equal(parameters_of(untouched)[name], value)


def test_a_changed_byte_is_caught_by_the_crc(tmp_path):
    _, _, path = fitted_checkpoint(tmp_path)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    data[middle + 1] ^= 0x0F
    damaged = str(tmp_path / "damaged.ckpt")
    with open(damaged, "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(ValueError, match="damaged.ckpt is corrupt: its contents do not match the CRC32"):
        TinyRegressor.load_from_checkpoint(damaged)
    x, y = make_data(16)
    with pytest.raises(ValueError, match="do not match the CRC32"):
        quiet_trainer(max_epochs=2).fit(fresh_model(), batches_of(x, y, 8), ckpt_path=damaged)
    # without its CRC trailer, a lightms checkpoint is refused too
    stripped = str(tmp_path / "stripped.ckpt")
    with open(stripped, "wb") as handle:
        handle.write(open(path, "rb").read()[:-17])
    with pytest.raises(ValueError, match="written with a CRC32, which is missing"):
        TinyRegressor.load_from_checkpoint(stripped)


def test_checkpoints_with_nan_or_infinite_values_are_refused_naming_the_parameters(tmp_path):
    from mindspore import Parameter, Tensor, ops

    model, trainer, _ = fitted_checkpoint(tmp_path)
    weight = model.net[2].weight.asnumpy().copy()
    weight[0, 3] = np.nan
    ops.assign(model.net[2].weight, Tensor(weight))
    path = str(tmp_path / "diverged.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"NaN or infinite values in model parameters \['net.2.weight'\]"):
        TinyRegressor.load_from_checkpoint(path)
    x, y = make_data(16)
    resumed = fresh_model()
    before = parameters_of(resumed)
    with pytest.raises(ValueError, match=r"\['net.2.weight'\]"):
        quiet_trainer(max_epochs=2).fit(resumed, batches_of(x, y, 8), ckpt_path=path)
    for name, value in before.items():  # nothing was copied in
        np.testing.assert_array_equal(parameters_of(resumed)[name], value)

    class Masked(TinyRegressor):  # a buffer may hold -inf on purpose (an attention mask); NaN never
        def __init__(self, lr=0.1):
            super().__init__(lr)
            self.mask = Parameter(Tensor(np.array([0.0, -np.inf], np.float32)), requires_grad=False)

    from lightms.checkpoint import write_checkpoint

    masked = Masked()
    write_checkpoint(str(tmp_path / "masked.ckpt"), [(p.name, p) for p in masked.get_parameters()], {})
    assert Masked.load_from_checkpoint(str(tmp_path / "masked.ckpt")).mask.asnumpy()[1] == -np.inf
    ops.assign(masked.mask, Tensor(np.array([np.nan, 0.0], np.float32)))
    write_checkpoint(str(tmp_path / "nan-mask.ckpt"), [(p.name, p) for p in masked.get_parameters()], {})
    with pytest.raises(ValueError, match=r"\['mask'\]"):
        Masked.load_from_checkpoint(str(tmp_path / "nan-mask.ckpt"))


def test_a_checkpoint_renamed_to_another_extension_loads(tmp_path):
    import shutil

    model, _, path = fitted_checkpoint(tmp_path, lr=0.05)
    renamed = str(tmp_path / "model.backup")
    shutil.copyfile(path, renamed)
    rebuilt = TinyRegressor.load_from_checkpoint(renamed)
    assert rebuilt.hparams.lr == 0.05
    np.testing.assert_array_equal(rebuilt.net[0].weight.asnumpy(), model.net[0].weight.asnumpy())
    x, y = make_data(16)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(fresh_model(), batches_of(x, y, 8), ckpt_path=renamed)
    assert trainer.global_step == 4
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is truncated or corrupt"):
        TinyRegressor.load_from_checkpoint(str(not_a_checkpoint))


def test_save_checkpoint_after_validate_writes_what_there_is(tmp_path):
    x, y = make_data(16)
    model = fresh_model(lr=0.05)
    trainer = quiet_trainer()
    trainer.validate(model, batches_of(x, y, 8))
    path = str(tmp_path / "validated.ckpt")
    trainer.save_checkpoint(path)
    rebuilt = TinyRegressor.load_from_checkpoint(path)
    assert rebuilt.hparams.lr == 0.05
    for name, value in parameters_of(model).items():
        np.testing.assert_array_equal(parameters_of(rebuilt)[name], value)
    with pytest.raises(ValueError, match="written outside fit .* no optimizer state"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), batches_of(x, y, 8), ckpt_path=path)


def test_an_epoch_end_checkpoint_resumes_its_epoch_schedulers(tmp_path):
    from mindspore.experimental import optim

    class EpochDecay(AdamRegressor):
        def configure_optimizers(self):
            opt = optim.Adam(self.trainable_params(), lr=0.05)
            return {"optimizer": opt, "lr_scheduler": optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    def fit(max_epochs, callbacks=(), ckpt_path=None):
        x, y = make_data(32)
        model = fresh_model(cls=EpochDecay)
        trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        trainer.fit(model, batches_of(x, y, 8), ckpt_path=ckpt_path)
        return model, float(trainer.optimizers[0].param_groups[0]["lr"].asnumpy())

    straight, straight_lr = fit(3)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))  # saved in on_train_epoch_end, before the scheduler steps
    fit(1, [checkpoint])
    resumed, resumed_lr = fit(3, ckpt_path=checkpoint.last_model_path)
    assert straight_lr == pytest.approx(0.05 * 0.5 ** 3) and resumed_lr == pytest.approx(straight_lr)
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)


def test_a_checkpoint_after_an_epochs_last_step_keeps_its_epoch_values_apart(tmp_path):
    class LogsEpochMean(AdamRegressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.log("xsum", x.sum(), on_step=False, on_epoch=True)
            return ((self(x) - y) ** 2).mean()

    def fit(callbacks=(), ckpt_path=None):
        x, y = make_data(32)
        logger = RecordingLogger()
        trainer = quiet_trainer(max_epochs=2, logger=logger, enable_checkpointing=bool(callbacks),
                                callbacks=list(callbacks))
        trainer.fit(fresh_model(cls=LogsEpochMean), batches_of(x, y, 8), ckpt_path=ckpt_path)
        return logger

    straight = fit()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=4, save_top_k=-1)  # epoch 0's last step
    fit([checkpoint])
    resumed = fit(ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))  # nothing left of epoch 0 to train
    assert_same_series(resumed.values("xsum"), straight.values("xsum"), atol=1e-4)  # epoch 0 and epoch 1, apart
