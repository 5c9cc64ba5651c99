"""ModelCheckpoint: which files a run may write, overwrite and delete, and where "last" is found."""

import os
import subprocess

import numpy as np
import pytest

import lightms
from lightms.callbacks import ModelCheckpoint
from conftest import AdamRegressor, batches_of, fresh_model, make_data, parameters_of, quiet_trainer


def contents(folder) -> dict:
    """name -> bytes of every file in `folder`."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def data(samples=40, size=8):
    return batches_of(*make_data(samples), size)  # 5 batches an epoch


def fit(max_epochs, callback, ckpt_path=None, **kwargs):
    model = fresh_model(cls=AdamRegressor)
    trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=True, callbacks=[callback], **kwargs)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return model, trainer


def test_resuming_into_a_new_folder_never_deletes_or_changes_the_old_runs_files(tmp_path):
    def trainer(max_epochs):
        return lightms.Trainer(max_epochs=max_epochs, default_root_dir=str(tmp_path), enable_progress_bar=False,
                               callbacks=[ModelCheckpoint(save_last=True)])

    trainer(2).fit(fresh_model(cls=AdamRegressor), data())
    old_folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    old = contents(old_folder)
    assert sorted(old) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    resumed = trainer(4)
    with pytest.warns(UserWarning, match="starts its own top-k"):
        resumed.fit(fresh_model(cls=AdamRegressor), data(), ckpt_path=str(old_folder / "last.ckpt"))
    assert contents(old_folder) == old  # the default folder is the new version's: nothing of version_0 touched
    new_folder = tmp_path / "lightning_logs" / "version_1" / "checkpoints"
    assert sorted(os.listdir(new_folder)) == ["epoch=3-step=20.ckpt", "last.ckpt"]

    # the same with an explicit new folder
    first = tmp_path / "first"
    fit(2, ModelCheckpoint(dirpath=str(first), save_last=True))
    before = contents(first)
    with pytest.warns(UserWarning, match="starts its own top-k"):
        fit(4, ModelCheckpoint(dirpath=str(tmp_path / "second"), save_last=True), ckpt_path=str(first / "last.ckpt"))
    assert contents(first) == before
    assert sorted(os.listdir(tmp_path / "second")) == ["epoch=3-step=20.ckpt", "last.ckpt"]


def test_a_new_run_in_the_same_folder_never_overwrites_last_ckpt(tmp_path):
    fit(1, ModelCheckpoint(dirpath=str(tmp_path), save_last=True))
    first = contents(tmp_path)
    assert sorted(first) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    _, trainer = fit(2, ModelCheckpoint(dirpath=str(tmp_path), save_last=True))
    now = contents(tmp_path)
    assert {name: now[name] for name in first} == first  # run 1's files, byte for byte
    # run 2 kept its own top-1 and last (overwriting its own last-v1 at its second save)
    assert sorted(now) == ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last-v1.ckpt", "last.ckpt"]
    assert trainer.checkpoint_callback.last_model_path == str(tmp_path / "last-v1.ckpt")


def test_a_run_resumed_into_its_own_folder_prunes_like_the_uninterrupted_run(tmp_path):
    straight = ModelCheckpoint(dirpath=str(tmp_path / "straight"), every_n_train_steps=2, save_top_k=1)
    fit(2, straight)
    assert sorted(os.listdir(tmp_path / "straight")) == ["epoch=1-step=10.ckpt"]

    folder = tmp_path / "resumed"
    fit(2, ModelCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_top_k=1), max_steps=4)
    assert sorted(os.listdir(folder)) == ["epoch=0-step=4.ckpt"]
    fit(2, ModelCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_top_k=1),
        ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    assert sorted(os.listdir(folder)) == ["epoch=1-step=10.ckpt"]  # the step-4 file was pruned, as it would have been


def test_monitored_top_k_continues_across_a_resume_into_the_same_folder(tmp_path):
    class Scored(AdamRegressor):
        def on_train_epoch_end(self):  # made-up scores by epoch: best two (min) are epochs 1 and 3
            self.log("score", [3.0, 1.0, 4.0, 2.0][self.current_epoch])

    def callback(folder):
        return ModelCheckpoint(dirpath=str(folder), monitor="score", save_top_k=2, filename="{epoch}")

    def run(max_epochs, folder, ckpt_path=None):
        trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=True, callbacks=[callback(folder)])
        trainer.fit(fresh_model(cls=Scored), data(), ckpt_path=ckpt_path)

    run(4, tmp_path / "straight")
    run(2, tmp_path / "resumed")
    run(4, tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed" / "epoch=1.ckpt"))
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "straight")) \
        == ["epoch=1.ckpt", "epoch=3.ckpt"]


def test_a_name_saved_twice_in_one_run_keeps_the_newest_file(tmp_path):
    # "{epoch}" names every step of an epoch alike: each save replaces the run's own file, never deletes it
    callback = ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}", every_n_train_steps=1, save_top_k=1)
    model, _ = fit(2, callback)
    assert sorted(os.listdir(tmp_path)) == ["epoch=1.ckpt"]
    saved = AdamRegressor.load_from_checkpoint(str(tmp_path / "epoch=1.ckpt"))  # the last step's weights
    for name, value in parameters_of(model).items():
        np.testing.assert_array_equal(parameters_of(saved)[name], value)


def test_bookkeeping_stays_bounded_over_many_saves(tmp_path):
    callback = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_top_k=2, save_last=True)
    fit(6, callback)  # 30 saves
    assert sorted(os.listdir(tmp_path)) == ["epoch=5-step=29.ckpt", "epoch=5-step=30.ckpt", "last.ckpt"]
    sizes = [len(value) for value in vars(callback).values() if isinstance(value, (list, set, dict))]
    assert max(sizes) <= 2


def test_ckpt_path_last_in_a_new_trainer_finds_the_default_folders_newest_checkpoint(tmp_path):
    def trainer(max_epochs):
        return lightms.Trainer(max_epochs=max_epochs, default_root_dir=str(tmp_path), enable_progress_bar=False)

    straight = fresh_model(cls=AdamRegressor)
    trainer(3).fit(straight, data())
    first = trainer(1)
    first.fit(fresh_model(cls=AdamRegressor), data())
    second = trainer(2)  # a new Trainer and a new default ModelCheckpoint, as in a new process
    second.fit(fresh_model(cls=AdamRegressor), data(), ckpt_path="last")  # version_1's epoch 0 -> epoch 1
    resumed, third = fresh_model(cls=AdamRegressor), trainer(3)
    third.fit(resumed, data(), ckpt_path="last")  # version_2's epoch 1 -> epoch 2
    assert third.global_step == 15
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(resumed)[name], value, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r'ckpt_path="last": no such checkpoint; looked in .*nothing'):
        lightms.Trainer(default_root_dir=str(tmp_path / "nothing"), enable_progress_bar=False).fit(
            fresh_model(), data(), ckpt_path="last")


def test_temporary_files_of_killed_writes_are_removed_and_others_kept(tmp_path):
    import re
    import socket

    exited = subprocess.Popen(["true"])
    exited.wait()  # its pid no longer runs
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    dead = f".epoch=0-step=1.ckpt.{host}.{exited.pid}.tmp.tmp"
    dead_renamed = f".epoch=0-step=1.ckpt.{host}.{exited.pid}.tmp.ckpt"
    alive = f".epoch=0-step=2.ckpt.{host}.{os.getppid()}.tmp.tmp"  # a live writer's: still being written
    # Another machine's write into a shared folder: its pid means nothing here, so it is kept.
    elsewhere = f".epoch=0-step=3.ckpt.other-node.{exited.pid}.tmp.ckpt"
    users = [".notes.ckpt", "mine.tmp"]
    for name in [dead, dead_renamed, alive, elsewhere] + users:
        (tmp_path / name).write_bytes(b"x" * 100)
    fit(1, ModelCheckpoint(dirpath=str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == sorted([alive, elsewhere, "epoch=0-step=5.ckpt"] + users)


def test_resuming_from_a_copy_elsewhere_into_the_old_folder_leaves_its_files_alone(tmp_path):
    import shutil

    folder = tmp_path / "run"
    fit(2, ModelCheckpoint(dirpath=str(folder), save_last=True))
    before = contents(folder)
    (tmp_path / "backup").mkdir()
    copy = tmp_path / "backup" / "epoch=1-step=10.ckpt"
    shutil.copyfile(folder / "epoch=1-step=10.ckpt", copy)
    with pytest.warns(UserWarning, match="starts its own top-k"):
        fit(3, ModelCheckpoint(dirpath=str(folder), save_last=True), ckpt_path=str(copy))
    now = contents(folder)
    assert {name: now[name] for name in before} == before  # nothing of the old run deleted or overwritten
    assert sorted(set(now) - set(before)) == ["epoch=2-step=15.ckpt", "last-v1.ckpt"]
