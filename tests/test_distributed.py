"""Data-parallel training on 2 CPU workers launched with msrun (`python -m lightms.launch`), against one process."""

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import lightms
from lightms.distributed.environment import msrun_workers
from lightms.launch import msrun_command

from conftest import quiet_trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ddp_worker  # noqa: E402

LAUNCH_TIMEOUT = 150


def launch(out_dir, *script_args):
    """Runs tests/ddp_worker.py on 2 workers; returns (exit code, seconds, the workers' logs)."""
    log_dir = os.path.join(out_dir, "logs")
    command = [sys.executable, "-m", "lightms.launch", "--devices", "2", "--log-dir", log_dir,
               os.path.join(HERE, "ddp_worker.py"), str(out_dir), *script_args]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    logs = "\n".join(f"== {path}\n{open(path, errors='replace').read()[-3000:]}"
                     for path in sorted(glob.glob(os.path.join(log_dir, "worker_*.log"))))
    return code, time.monotonic() - start, logs


def write_one_process_checkpoint(out):
    """One process trains 4 of the 8 batches and checkpoints there (mid-epoch), for "resumed" to go on from."""
    import lightms.callbacks

    lightms.seed_everything(0)
    saver = lightms.callbacks.ModelCheckpoint(dirpath=str(out / "one"), every_n_train_steps=4, save_top_k=-1)
    quiet_trainer(max_epochs=1, callbacks=[saver], enable_checkpointing=True).fit(ddp_worker.Regressor(),
                                                                                  ddp_worker.global_batches())
    os.replace(out / "one" / "epoch=0-step=4.ckpt", out / ddp_worker.RESUMED_FROM["resumed"])
    os.replace(out / "one" / "epoch=0-step=8.ckpt", out / ddp_worker.RESUMED_FROM["resumed_end"])


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    write_one_process_checkpoint(out)
    code, seconds, logs = launch(out)
    assert code == 0, f"msrun ended with {code} after {seconds:.0f} s; worker logs:\n{logs}"
    return out


def single_process(config, out):
    """One process on the global batch: each step's batch is the two workers' batches together."""
    batches = ddp_worker.global_batches()
    merged = [tuple(np.concatenate(parts) for parts in zip(a, b)) for a, b in zip(batches[::2], batches[1::2])]
    lightms.seed_everything(0)
    model = ddp_worker.model_for(config)
    if config == "dataset":  # the same shuffled rows, 8 to a batch (MindSpore deals them out to the workers in turn)
        merged = ddp_worker.pipeline(8)
    if config == "resumed":  # from the one-process checkpoint's weights: the workers' remaining batches, merged
        import mindspore as ms

        ms.load_param_into_net(model, ms.load_checkpoint(str(out / ddp_worker.RESUMED_FROM[config])))
        merged = merged[2:]
    quiet_trainer(max_epochs=1, **ddp_worker.CONFIGS[config]).fit(model, merged)
    return {p.name: p.asnumpy() for p in model.trainable_params()}


@pytest.mark.parametrize("config", sorted(set(ddp_worker.CONFIGS) - {"resumed_end"}))
def test_two_workers_equal_one_process_on_the_global_batch(two_workers, config):
    ranks = [np.load(two_workers / f"{config}-rank{rank}.npz") for rank in (0, 1)]
    assert [int(r["world_size"]) for r in ranks] == [2, 2]
    # Each worker's share: 4 of the 8 batches; the pipeline's 36 rows sharded where they are read, 18 to a worker
    # in batches of 4, 4, 4, 4, 2 (split by batch, a worker would get 4 of the 9 batches); resumed after 4 of 8.
    batches = {"dataset": 5, "resumed": 4}.get(config, 4)
    assert [int(r["num_training_batches"]) for r in ranks] == [batches, batches]
    steps = [int(r["global_step"]) for r in ranks]
    if config == "mixed":  # a step whose scaled gradients overflow is skipped (on both ranks alike)
        assert steps[0] == steps[1] and 1 <= steps[0] <= 4
    else:
        assert steps == [{"resumed": 6, "acc2": 2, "dataset": 5}.get(config, 4)] * 2
    # A sum logged with sync_dist: each step value counts both workers' micro-batches, the epoch value every
    # micro-batch of the epoch (8 of 4 rows, 10 of the pipeline; resumed: rank 0 holds the first 4's count).
    window = 2 if config == "acc2" else 1
    for r in ranks:
        counted = r["steps:batches_step"][~np.isnan(r["steps:batches_step"])]
        assert counted.size and set(counted.tolist()) == {2.0 * window}
        assert float(r["metric:batches_epoch"]) == (10 if config == "dataset" else 8)
    expected = single_process(config, two_workers)
    for name, value in expected.items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=f"ranks differ in {name}")
        # Under float16 autocast the half-batches round otherwise than the whole batch: half precision's tolerance.
        tolerance = 1e-3 if config == "mixed" else 1e-5
        np.testing.assert_allclose(ranks[0][name], value, rtol=tolerance, atol=tolerance, err_msg=name)
    # Without sync_dist each rank reports its own shard's loss; with it, the mean (or max) over both shards.
    assert ranks[0]["metric:loss"] != ranks[1]["metric:loss"]
    own = [float(r["metric:loss"]) for r in ranks]
    # Resumed: rank 0 holds the epoch's first 16 rows (the checkpoint's sums) and its own 8, rank 1 its 8.
    weights = [24, 8] if config == "resumed" else [1, 1]
    for r in ranks:
        assert float(r["metric:loss_mean"]) == pytest.approx(np.average(own, weights=weights), rel=1e-6)
        assert float(r["metric:loss_max"]) == max(float(q["metric:loss_own_max"]) for q in ranks)
        assert (float(r["metric:rank_mean"]), float(r["metric:rank_max"])) == (0.5, 1.0)  # logged in a hook
    # Step values: with sync_dist the mean (and min) over the workers, reduced inside the compiled step.
    own = np.stack([r["steps:step_own"] for r in ranks])
    assert own.shape[1] >= 2 and not np.array_equal(own[0], own[1])
    for r in ranks:
        np.testing.assert_allclose(r["steps:step_mean"], own.mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(r["steps:step_min"], np.min([q["steps:step_own_min"] for q in ranks], axis=0))


def test_a_resume_with_nothing_left_in_the_epoch_ends_it_on_every_worker(two_workers):
    import mindspore as ms

    # One process's checkpoint after all 8 batches of the epoch, before its end: 2 workers train nothing, end the
    # epoch together (their epoch values are reduced alike) and keep the checkpoint's weights.
    ranks = [np.load(two_workers / f"resumed_end-rank{rank}.npz") for rank in (0, 1)]
    saved = ms.load_checkpoint(str(two_workers / ddp_worker.RESUMED_FROM["resumed_end"]))
    for r in ranks:
        assert int(r["global_step"]) == 8 and r["steps:step_own"].size == 0
        assert float(r["metric:batches_epoch"]) == 8  # rank 0's saved count, reduced with rank 1's nothing
        assert float(r["metric:loss_mean"]) == float(ranks[0]["metric:loss"])  # rank 0 alone holds the epoch
        for name in ("net.0.weight", "net.2.bias"):
            np.testing.assert_array_equal(r[name], saved[name].asnumpy())


def test_every_worker_validates_all_the_data(two_workers):
    # "plain" validated on the 8 batches (32 rows) after its epoch: each worker over all of them, so the values
    # are the whole data's (a sum logged with sync_dist is not doubled), equal to numpy with the final weights.
    x = np.concatenate([b[0] for b in ddp_worker.global_batches()])
    y = np.concatenate([b[1] for b in ddp_worker.global_batches()])
    for rank in (0, 1):
        r = np.load(two_workers / f"plain-rank{rank}.npz")
        hidden = np.tanh(x @ r["net.0.weight"].T + r["net.0.bias"])
        mse = float((((hidden @ r["net.2.weight"].T + r["net.2.bias"]) - y) ** 2).mean())
        assert float(r["metric:val_loss"]) == pytest.approx(mse, rel=1e-5)
        assert float(r["metric:val_rows"]) == 32


def test_only_rank_zero_writes_logs_and_checkpoints(two_workers):
    # (In "plain", rank 1 also fell 12 s behind at its epoch's end, longer than the launcher's MS_NODE_TIMEOUT=10
    # for msrun's scheduler: the workers waited for each other as long as the strategy says, and the run went on.)
    root = two_workers / "plain"
    versions = sorted(os.listdir(root / "lightning_logs"))
    assert versions == ["version_0"]
    events = glob.glob(str(root / "lightning_logs" / "version_0" / "events.out.tfevents.*"))
    checkpoints = os.listdir(root / "lightning_logs" / "version_0" / "checkpoints")
    assert len(events) == 1 and len(checkpoints) == 1
    assert not os.path.exists(root / "checkpoints")  # rank 1's default folder: nothing written there


def test_the_two_worker_checkpoint_resumes_in_one_process(two_workers):
    root = two_workers / "plain" / "lightning_logs" / "version_0" / "checkpoints"
    path = str(root / os.listdir(root)[0])
    lightms.seed_everything(1)
    model = ddp_worker.Regressor()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, ddp_worker.global_batches(), ckpt_path=path)  # nothing left to train: the saved epoch
    saved = np.load(two_workers / "plain-rank0.npz")
    for p in model.trainable_params():
        np.testing.assert_array_equal(p.asnumpy(), saved[p.name])


def test_a_worker_that_raises_ends_the_launch_nonzero_within_the_bound(tmp_path):
    code, seconds, logs = launch(tmp_path, "raise")
    assert code not in (0, None), f"exit code {code} after {seconds:.0f} s:\n{logs}"
    assert seconds < 90
    assert "rank 1 fails on purpose" in logs


def start_long_launch(out_dir, mode, **environ):
    """Starts tests/ddp_worker.py in "long" or "hang" mode on 2 workers; returns the launcher once both train."""
    command = [sys.executable, "-m", "lightms.launch", "--devices", "2", "--log-dir", str(out_dir / "logs"),
               os.path.join(HERE, "ddp_worker.py"), str(out_dir), mode]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **environ})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and launcher.poll() is None and not all(
            (out_dir / f"training-rank{rank}").exists() for rank in (0, 1)):
        time.sleep(0.2)
    return launcher


def wait_for_end(launcher, start=None):
    """(exit code or None after 90 s, seconds from `start` or now); kills the launch if it is still running."""
    start = time.monotonic() if start is None else start
    try:
        code = launcher.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return code, time.monotonic() - start


def worker_logs(out_dir) -> str:
    return "\n".join(open(p, errors="replace").read()[-3000:] for p in glob.glob(str(out_dir / "logs" / "*.log")))


def test_a_worker_that_dies_ends_the_launch_nonzero_within_the_bound(tmp_path):
    import signal

    launcher = start_long_launch(tmp_path, "long")
    if (tmp_path / "training-rank1").exists():
        time.sleep(0.5)  # inside an epoch
        os.kill(int((tmp_path / "training-rank1").read_text()), signal.SIGKILL)
    code, seconds = wait_for_end(launcher)
    assert (tmp_path / "training-rank1").exists(), "the workers did not start training"
    # On one machine msrun sees the death and ends the other worker at once.
    assert code not in (0, None) and seconds < 30, (code, seconds, worker_logs(tmp_path))


def test_a_worker_that_stops_answering_ends_the_run_after_the_strategys_timeout(tmp_path):
    # What a worker sees when a worker on another machine died: no answer. Rank 1 sleeps in a hook with its own
    # watchdog stopped. MindSpore's CPU collectives are told to wait 600 s (other backends' may wait forever), so
    # only rank 0's watchdog can end the run in time.
    launcher = start_long_launch(tmp_path, "hang", MS_CPU_COMM_OP_TIMEOUT="600")
    code, seconds = wait_for_end(launcher)
    assert (tmp_path / "training-rank0").exists(), "the workers did not start training"
    logs = worker_logs(tmp_path)
    assert code not in (0, None), logs
    assert seconds < 8 + 30, logs  # DDPStrategy(timeout=8), then msrun ends the rest
    assert "lightms: worker 0 stops: it has made no progress for" in logs, logs
    assert "DDPStrategy(timeout=seconds)" in logs


def test_the_workers_wait_for_each_other_as_long_as_the_strategy_says(monkeypatch):
    from lightms.distributed.watchdog import explain_collective_failure
    from lightms.launch import LAUNCHER_NODE_TIMEOUT, launch_environment

    # The launcher's MS_NODE_TIMEOUT is for msrun's scheduler; the user's is the workers' wait.
    env = launch_environment({"PATH": "/bin"})
    assert env["MS_NODE_TIMEOUT"] == "10" and LAUNCHER_NODE_TIMEOUT in env
    assert LAUNCHER_NODE_TIMEOUT not in launch_environment({"MS_NODE_TIMEOUT": "60"})
    monkeypatch.setenv("MS_NODE_TIMEOUT", "77")
    assert lightms.Trainer().ddp.timeout == 77.0
    monkeypatch.setenv(LAUNCHER_NODE_TIMEOUT, "10")
    assert lightms.Trainer().ddp.timeout == 1800.0
    # What MindSpore 2.10's CPU AllReduce raised when the other worker did not answer in time (from a worker log).
    error = RuntimeError("Launch kernel failed, name:Default/AllReduce-op1\n\n- C++ Call Stack: ...")
    explained = explain_collective_failure(error, 0, "epoch 2, step 12", 60)
    assert "worker 0 stops at epoch 2, step 12: a collective with the other workers failed" in str(explained)
    assert explain_collective_failure(RuntimeError("Launch kernel failed, name:Default/MatMul-op3"), 0, "", 1) is None
    assert explain_collective_failure(ValueError("AllReduce"), 0, "", 1) is None


def test_ddp_strategy_takes_seconds_or_a_timedelta():
    import datetime

    assert lightms.DDPStrategy().timeout == 1800.0
    assert lightms.DDPStrategy(timeout=datetime.timedelta(minutes=2)).timeout == 120.0
    with pytest.raises(ValueError, match="positive number of seconds"):
        lightms.DDPStrategy(timeout=0)
    with pytest.raises(RuntimeError, match="python -m lightms.launch"):
        lightms.Trainer(strategy=lightms.DDPStrategy(timeout=60))  # data-parallel: needs msrun


def test_the_watchdog_ends_the_process_only_without_beats():
    from lightms.distributed.watchdog import Watchdog

    ended = []
    watchdog = Watchdog(1.0, rank=0, end=ended.append).start()
    for step in range(8):  # beats 0.2 s apart: never a second without one, even on a loaded machine
        time.sleep(0.2)
        watchdog.beat("step %d", step)
    assert ended == []
    time.sleep(2.5)
    watchdog.stop()
    assert ended == [1]


def test_ddp_outside_msrun_says_how_to_launch_and_the_command_is_msruns():
    assert msrun_workers({}) == 0
    with pytest.raises(RuntimeError, match="python -m lightms.launch --devices N"):
        lightms.Trainer(strategy="ddp")
    with pytest.raises(RuntimeError, match=r"Trainer\(devices=2, num_nodes=1\) runs data-parallel"):
        lightms.Trainer(devices=2)  # no silent single process
    assert lightms.Trainer(devices=1).world_size == 1
    command = msrun_command("train.py", ["--lr", "0.1"], devices=2, num_nodes=2, node_rank=1,
                            master_addr="10.0.0.1", master_port=8118)
    assert command[1:3] == ["-m", "mindspore.parallel.cluster.run"]
    assert {"--worker_num=4", "--local_worker_num=2", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=8118"} <= set(command)
    assert command[-3:] == ["train.py", "--lr", "0.1"]


def test_sigterm_to_the_launcher_stops_every_worker_with_one_resumable_checkpoint(tmp_path):
    import signal

    log_dir = tmp_path / "logs"
    launcher = start_long_launch(tmp_path, "long")
    if (tmp_path / "training-rank0").exists():
        launcher.send_signal(signal.SIGTERM)
    code, _ = wait_for_end(launcher)
    assert (tmp_path / "training-rank0").exists(), "the workers did not start training"
    logs = "\n".join(open(p, errors="replace").read()[-2000:] for p in glob.glob(str(log_dir / "worker_*.log")))
    assert code == 128 + signal.SIGTERM, logs
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    interrupted = [name for name in os.listdir(folder) if name.startswith("interrupted-")]
    assert len(interrupted) == 1, (os.listdir(folder), logs)
    assert logs.count("SIGINT/SIGTERM received; stopped after optimizer step") == 2  # both, at the same step
    steps = {line.split("optimizer step ")[1].split(";")[0] for line in logs.splitlines() if "stopped after" in line}
    assert len(steps) == 1
    # One process resumes at the same place in the data: the two workers had read 2 * batches_done batches.
    from lightms.checkpoint.io import read_checkpoint

    loop = read_checkpoint(str(folder / interrupted[0]))[1]["loop"]
    assert loop["world_size"] == 2
    lightms.seed_everything(1)
    trainer = quiet_trainer(max_epochs=loop["epoch"] + 1)
    trainer.fit(ddp_worker.Regressor(), ddp_worker.global_batches(), ckpt_path=str(folder / interrupted[0]))
    assert trainer.global_step == loop["global_step"] + 8 - 2 * loop["batches_done"]


def test_a_checkpoints_position_maps_onto_another_number_of_workers():
    from lightms.trainer.trainer import LoopState

    saved = {"epoch": 3, "global_step": 40, "batches_done": 3, "world_size": 2}
    for world_size, expected in ((1, 6), (2, 3), (3, 2), (6, 1)):
        state = LoopState()
        state.load_state_dict(saved, 0, world_size)
        assert (state.current_epoch, state.global_step, state.batches_done) == (3, 40, expected)
    with pytest.raises(ValueError, match="cannot split evenly"):
        LoopState().load_state_dict(saved, 0, 4)
    with pytest.raises(ValueError, match="inside an accumulation window"):
        LoopState().load_state_dict(saved, 1, 1)
    for saved_world, world in ((2, 2), (1, 2)):  # other workers' partial gradients are not in the checkpoint
        with pytest.raises(ValueError, match="only rank 0's were saved"):
            LoopState().load_state_dict({**saved, "world_size": saved_world}, 1, world)
    state = LoopState()
    state.load_state_dict({"epoch": 1, "global_step": 5, "batches_done": 2}, 0, 1)  # older checkpoints: 1 worker
    assert state.batches_done == 2


# ---- each worker's share of a mindspore.dataset pipeline (in one process: no launch needed) ----------------------
def _rows(dataset, epochs=1):
    iterator = dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    return [[batch[0].ravel().tolist() for batch in iterator] for _ in range(epochs)]


def _pipeline(count=11, batch=3, shuffle=True):
    import mindspore.dataset as msds

    x = np.arange(count, dtype=np.float32)
    return msds.NumpySlicesDataset({"x": x}, shuffle=shuffle).map(lambda v: v + 0, input_columns="x").batch(batch)


def test_a_pipeline_is_sharded_where_it_reads_with_equal_shares_and_the_users_pipeline_unchanged():
    import mindspore.dataset as msds

    from lightms.distributed.sharding import shard_pipeline

    msds.config.set_seed(3)
    whole = _rows(_pipeline(batch=6), epochs=2)  # one process on the global batch (2 x 3)
    shares = []
    for rank in (0, 1):
        msds.config.set_seed(3)
        original = _pipeline()
        sharded, why = shard_pipeline(original, rank, 2)
        assert why == "" and sharded is not original
        assert sharded.get_dataset_size() == 2 and original.get_dataset_size() == 4
        shares.append(_rows(sharded, epochs=2))
        assert sorted(sum(_rows(original)[0], [])) == list(range(11))  # the user's pipeline still reads everything
    for epoch in range(2):
        rows = [sum(shares[rank][epoch], []) for rank in (0, 1)]
        assert len(rows[0]) == len(rows[1]) == 6  # 11 rows: the last round is padded with the epoch's first row
        assert sorted(rows[0] + rows[1]) == sorted(list(range(11)) + [whole[epoch][0][0]])
        # The workers' first batches together are the single process's first global batch.
        assert sorted(shares[0][epoch][0] + shares[1][epoch][0]) == sorted(whole[epoch][0])


def test_pipelines_that_cannot_be_sharded_where_they_read_are_split_by_batch_with_a_warning():
    import mindspore.dataset as msds

    from lightms.trainer.data import DataSource

    class Stream:  # iterable only: MindSpore would ignore a sampler
        def __iter__(self):
            return iter([(np.full(1, i, np.float32),) for i in range(8)])

    for dataset, reason in ((msds.GeneratorDataset(Stream(), ["x"], shuffle=False).batch(2), "no __getitem__"),
                            (_pipeline(count=8, batch=2, shuffle=False).take(4), "TakeDataset")):
        source = DataSource(dataset, "train_dataloaders")
        with pytest.warns(UserWarning, match=reason):
            source.shard(1, 2)
        assert [b.data[0].asnumpy().ravel().tolist() for b in source.batches()] == [[2, 3], [6, 7]]


def test_a_pipeline_built_sharded_is_this_workers_share_and_other_shards_are_refused():
    import mindspore.dataset as msds

    from lightms.trainer.data import DataSource

    x = np.arange(8, dtype=np.float32)
    built = msds.NumpySlicesDataset({"x": x}, shuffle=False, num_shards=2, shard_id=1).batch(2)
    source = DataSource(built, "train_dataloaders")
    source.shard(1, 2)
    assert [b.data[0].asnumpy().tolist() for b in source.batches()] == [[1, 3], [5, 7]]  # not split again
    with pytest.raises(ValueError, match="built with num_shards=2, shard_id=1, but this is worker 0 of 2"):
        DataSource(built, "train_dataloaders").shard(0, 2)
    limited = DataSource([(np.full((1, 1), i, np.float32),) for i in range(5)], "train_dataloaders")
    limited.limit_to(3)  # the fewest batches any worker has
    assert len(limited) == 3
    assert [float(b.data[0].asnumpy()) for b in limited.batches()] == [0.0, 1.0, 2.0]


def test_evaluation_data_built_sharded_is_refused_with_several_workers():
    import mindspore.dataset as msds

    from lightms.trainer.data import DataSource

    built = msds.NumpySlicesDataset({"x": np.arange(8, dtype=np.float32)}, num_shards=2, shard_id=0).batch(2)
    DataSource(built, "val_dataloaders").check_whole(1)  # one process: its data, as given
    with pytest.raises(ValueError, match="val_dataloaders was built with num_shards=2: lightms evaluates all"):
        DataSource(built, "val_dataloaders").check_whole(2)


def test_a_pipeline_sharded_through_its_sampler_is_not_sharded_again():
    import mindspore.dataset as msds

    from lightms.trainer.data import DataSource

    x = np.arange(8, dtype=np.float32)
    built = msds.NumpySlicesDataset({"x": x}, sampler=msds.DistributedSampler(2, 0, shuffle=False)).batch(2)
    source = DataSource(built, "train_dataloaders")
    source.shard(0, 2)
    assert [b.data[0].asnumpy().tolist() for b in source.batches()] == [[0, 2], [4, 6]]


def test_only_names_reporting_step_values_are_reduced_inside_the_step():
    from lightms.module.device_logs import DeviceLogBuffers
    from lightms.module.logging import LogOptions

    # An epoch-only name is reduced at the epoch's end: no collective in every step for it.
    epoch_only = LogOptions("loss", False, True, on_step=False, on_epoch=True, reduce_fx="max", batch_size=None,
                            sync_dist=True)
    assert DeviceLogBuffers([epoch_only], world_size=2).sync is None


def test_a_later_trainer_with_another_timeout_is_told_mindspore_keeps_the_first(monkeypatch):
    import types

    from lightms.distributed import environment

    fake = types.SimpleNamespace(get_group_size=lambda: 2, get_rank=lambda: 1, get_local_rank=lambda: 1)
    monkeypatch.setattr("mindspore.communication.get_group_size", fake.get_group_size)
    monkeypatch.setattr("mindspore.communication.get_rank", fake.get_rank)
    monkeypatch.setattr("mindspore.communication.get_local_rank", fake.get_local_rank)
    monkeypatch.setattr(environment, "_joined", lambda: True)
    monkeypatch.setenv("MS_NODE_TIMEOUT", "1800")
    with pytest.warns(UserWarning, match="joined the others with a 1800 s wait"):
        assert environment.join_cluster(60).global_rank == 1
