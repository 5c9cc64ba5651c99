"""Chunks and sinking: Trainer(sink_size=N) equals sink_size=1 and a hand-written loop, really sinks; batch passing."""

import os

import numpy as np
import pytest

import lightms
from lightms.trainer import chunks
from lightms.trainer.chunks import SunkBatches
from lightms.callbacks import Callback, ModelCheckpoint
from lightms._mindspore import mindspore as ms
from mindspore import Tensor, nn
from conftest import (RecordingLogger, StepDecayRegressor, TinyRegressor, batches_of, fresh_model, make_data,
                      parameters_of, quiet_trainer, reference_sgd)


class AdamLogger(TinyRegressor):
    """Adam (stateful), and logs on step and epoch, including live device counters."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss, on_step=True, on_epoch=True)
        self.log("xsum", x.sum(), on_step=True, on_epoch=True, reduce_fx="sum")
        self.log("seen_step", self.global_step * 1.0, on_step=True, on_epoch=False)
        self.log("seen_idx", batch_idx * 1.0, on_step=True, on_epoch=False, reduce_fx="max")
        return loss

    def configure_optimizers(self):
        return nn.Adam(self.trainable_params(), learning_rate=1e-2)


class ChunkRecorder(Callback):
    """Records what batch-level hooks see."""

    def __init__(self):
        self.starts, self.ends, self.ranges = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append((batch_idx, len(batch) if isinstance(batch, SunkBatches) else 1))
        self.ranges.append(trainer.sink_batches)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append((batch_idx, trainer.global_step))


def fit(sink_size, accumulate=1, epochs=2, samples=100, batch=8, cls=AdamLogger, **kwargs):
    """13 batches per epoch (the last has 4 samples); returns (model, trainer, logger, recorder)."""
    x, y = make_data(samples)
    logger, recorder = RecordingLogger(), ChunkRecorder()
    model = fresh_model(cls=cls)
    callbacks = [recorder] + list(kwargs.pop("callbacks", []))
    val = kwargs.pop("val", None)
    trainer = quiet_trainer(max_epochs=epochs, sink_size=sink_size, accumulate=accumulate, logger=logger,
                            log_every_n_steps=kwargs.pop("log_every_n_steps", 2), callbacks=callbacks,
                            enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)
    trainer.fit(model, batches_of(x, y, batch), val)
    return model, trainer, logger, recorder


def assert_same_parameters(a, b, atol=1e-6):
    for name, value in parameters_of(a).items():
        np.testing.assert_allclose(parameters_of(b)[name], value, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("sink_size", [4, 5, "epoch"])
def test_sinking_equals_one_step_per_call(sink_size, accumulate):
    base, base_trainer, base_log, _ = fit(1, accumulate)
    model, trainer, log, recorder = fit(sink_size, accumulate)
    assert_same_parameters(base, model)
    assert trainer.global_step == base_trainer.global_step == 2 * -(-13 // accumulate)
    # every step log_every_n_steps selects reaches the logger, with the same values, at the same step
    assert [step for step, _ in log.metrics] == [step for step, _ in base_log.metrics]
    for (_, got), (_, expected) in zip(log.metrics, base_log.metrics):
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[k] for k in sorted(got)], [expected[k] for k in sorted(got)],
                                   atol=1e-5, rtol=1e-6)
    # global_step and batch_idx read inside the graph are live (batch_idx restarts each epoch: 13 batches)
    seen_idx = dict(log.values("seen_idx"))
    if accumulate == 1:
        assert log.values("seen_step")[:3] == [(2, 1.0), (4, 3.0), (6, 5.0)]
        assert [seen_idx[s] for s in (2, 4, 12, 14, 16)] == [1.0, 3.0, 11.0, 0.0, 2.0]
    else:
        assert log.values("seen_step")[:2] == [(2, 1.0), (4, 3.0)]
        assert [seen_idx[s] for s in (2, 4, 6, 8)] == [5.0, 11.0, 2.0, 8.0]  # the max over each window
    assert trainer.callback_metrics["xsum_epoch"] == pytest.approx(base_trainer.callback_metrics["xsum_epoch"],
                                                                   abs=1e-4)
    # it really sinks: one host call per chunk (the 4-sample last batch runs on its own)
    length = 13 if sink_size == "epoch" else sink_size
    full_chunks = -(-12 // length)
    assert len(recorder.starts) == 2 * (full_chunks + 1)
    assert recorder.ranges[0] == range(0, min(length, 12))
    assert recorder.ranges[full_chunks] == range(12, 13)
    assert recorder.ends[0][0] == min(length, 12) - 1


class StepValues(Callback):
    """Records callback_metrics' step values after each host call, by global step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.by_step[trainer.global_step] = (metrics["loss_step"], metrics["seen_idx"])


@pytest.mark.parametrize("sink_size", [5, "epoch"])
def test_a_chunks_last_step_value_is_what_sink_size_1_reports_at_that_step(sink_size):
    # Chunks end at steps 5, 10, 12, 13, ... (sink_size=5): odd steps, which log_every_n_steps=2 does not
    # send to the logger, so callback_metrics shows the step level the sunk graph left behind.
    per_step, per_chunk = StepValues(), StepValues()
    fit(1, callbacks=[per_step])
    fit(sink_size, callbacks=[per_chunk])
    assert len(per_chunk.by_step) >= 4
    for step, (loss, seen_idx) in per_chunk.by_step.items():
        assert loss == pytest.approx(per_step.by_step[step][0], abs=1e-6), step
        assert seen_idx == per_step.by_step[step][1], step


@pytest.mark.parametrize("accumulate", [1, 4])
def test_sinking_matches_a_hand_written_sgd_loop(accumulate):
    # no logger here: the sunk graph keeps no step history
    x, y = make_data(100)
    batches = batches_of(x, y, 8)
    model = fresh_model()
    quiet_trainer(max_epochs=1, sink_size=6, accumulate=accumulate).fit(model, batches)
    reference = fresh_model()
    windows = [batches[i:i + accumulate] for i in range(0, 12, accumulate)] + [batches[12:]]
    reference_sgd(reference, windows, lr=0.1)
    assert_same_parameters(reference, model, atol=1e-6)


def test_sinking_does_not_recompile_after_the_first_epoch():
    counts = []

    class CountGraphs(Callback):
        def on_train_epoch_end(self, trainer, module):
            counts.append(lightms.compiled_graph_count())

    fit(5, 1, epochs=3, callbacks=[CountGraphs()])
    assert counts[1] == counts[0] == counts[2]


def test_chunks_end_at_validation_checkpoint_and_max_steps(tmp_path):
    x, y = make_data(40)
    val = batches_of(x, y, 20)
    seen_at = []

    class ValSteps(Callback):
        def on_validation_start(self, trainer, module):
            seen_at.append(trainer.global_step)

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1)
    model, trainer, _, recorder = fit(5, 1, epochs=3, val_check_interval=4, max_steps=17, val=val,
                                      callbacks=[ValSteps(), checkpoint], enable_checkpointing=True)
    assert trainer.global_step == 17
    assert seen_at == [4, 8, 12, 16]
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ckpt"))
    assert files == sorted(f"epoch={s // 13}-step={s}.ckpt" for s in (3, 6, 9, 12, 15))
    # the checkpoint at step 6 holds the weights a one-step-per-call run has after 6 steps
    base, _, _, _ = fit(1, 1, epochs=1, max_steps=6)
    saved = ms.load_checkpoint(os.path.join(tmp_path, "epoch=0-step=6.ckpt"))
    for name, value in parameters_of(base).items():
        np.testing.assert_allclose(saved[name].asnumpy(), value, atol=1e-6, rtol=0)
    assert [end for _, end in recorder.ends][:5] == [3, 4, 6, 8, 9]  # cut at each checkpoint and validation


def test_a_fractional_val_check_interval_validates_at_the_same_steps_when_sinking():
    x, y = make_data(96)
    seen = {}
    for sink_size in (1, 3):
        at = seen[sink_size] = []

        class ValPositions(Callback):
            def on_validation_start(self, trainer, module):
                at.append((trainer.global_step, trainer.state.batches_done))

        quiet_trainer(max_epochs=1, sink_size=sink_size, accumulate=2, val_check_interval=0.25,
                      callbacks=[ValPositions()]).fit(fresh_model(), batches_of(x, y, 8), batches_of(x, y, 48))
    assert seen[3] == seen[1] == [(3, 6), (6, 12)]  # batch 3 and 9 are mid-window: no validation there


def test_resume_from_a_checkpoint_written_inside_a_sunk_epoch(tmp_path):
    straight, straight_trainer, _, _ = fit(4, 3, epochs=2)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1)
    fit(4, 3, epochs=1, max_steps=2, callbacks=[checkpoint], enable_checkpointing=True)
    path = os.path.join(tmp_path, "epoch=0-step=2.ckpt")
    x, y = make_data(100)
    resumed = fresh_model(cls=AdamLogger)
    trainer = quiet_trainer(max_epochs=2, sink_size=4, accumulate=3)
    trainer.fit(resumed, batches_of(x, y, 8), ckpt_path=path)
    assert trainer.global_step == straight_trainer.global_step
    assert_same_parameters(straight, resumed)


def test_hooks_get_the_chunk_and_its_first_and_last_index(monkeypatch):
    # one graph call per chunk: count the calls into compiled training graphs
    from lightms.engine.engine import GraphFunction

    calls = []
    run = GraphFunction.compile_and_run

    def counting(self, *inputs):
        calls.append(len(inputs))
        return run(self, *inputs)

    monkeypatch.setattr(GraphFunction, "compile_and_run", counting)
    _, _, _, recorder = fit(4, 1, epochs=1)
    # 4 chunks for 13 batches, each one sink_step(batches, window_sizes, count); then the epoch end's finite check
    assert calls == [3, 3, 3, 3, 0]
    assert recorder.starts == [(0, 4), (4, 4), (8, 4), (12, 1)]
    assert recorder.ends == [(3, 4), (7, 8), (11, 12), (12, 13)]


def test_bad_sink_sizes_and_batches_are_named():
    with pytest.raises(ValueError, match="sink_size"):
        lightms.Trainer(sink_size=0)
    with pytest.raises(ValueError, match="sink_size"):
        lightms.Trainer(sink_size="all")
    with pytest.raises(TypeError, match="sink_size"):
        lightms.Trainer(sink_size=2.5)
    with pytest.warns(UserWarning, match="sinking needs compiled steps"):
        lightms.Trainer(sink_size=4, compile=False)

    class Nested(TinyRegressor):
        def training_step(self, batch, batch_idx):
            (x, y), _ = batch
            return ((self(x) - y) ** 2).mean()

    x, y = make_data(16)
    nested = [((x[i:i + 4], y[i:i + 4]), y[i:i + 4]) for i in range(0, 16, 4)]
    with pytest.raises(ValueError, match="flat tuple, list or dict"):
        quiet_trainer(max_epochs=1, sink_size=2).fit(fresh_model(cls=Nested), nested)

    class Endless:
        def __iter__(self):
            return iter(batches_of(x, y, 4))

    with pytest.raises(ValueError, match='sink_size="epoch"'):
        quiet_trainer(max_epochs=1, sink_size="epoch").fit(fresh_model(), Endless())


def test_step_schedulers_and_anomaly_detection_say_they_end_every_chunk():
    class StepScheduled(StepDecayRegressor):
        decay_every = 2

    with pytest.warns(UserWarning, match="interval 'step'"):
        sunk, _, _, recorder = fit(4, 1, epochs=1, cls=StepScheduled)
    assert len(recorder.starts) == 13
    base, _, _, _ = fit(1, 1, epochs=1, cls=StepScheduled)
    assert_same_parameters(base, sunk)
    with pytest.warns(UserWarning, match="detect_anomaly"):
        fit(4, 2, epochs=1, detect_anomaly=True)


def test_a_sink_length_that_does_not_fit_in_memory_is_shortened_loudly(monkeypatch):
    from lightms.trainer import chunks

    x, y = make_data(100)
    per_batch = x[:8].nbytes + y[:8].nbytes
    assert chunks.fit_in_memory(13, batches_of(x, y, 8)[0], limit=5 * per_batch) == 5
    fit_in_memory = chunks.fit_in_memory
    monkeypatch.setattr(chunks, "SINK_MEMORY_LIMIT", 5 * per_batch)
    monkeypatch.setattr(chunks, "fit_in_memory", lambda length, data: fit_in_memory(length, data, 5 * per_batch))
    with pytest.warns(UserWarning, match="lightms sinks 5 per host call"):
        model, trainer, _, recorder = fit("epoch", 1, epochs=1)
    assert recorder.ranges[:3] == [range(0, 5), range(5, 10), range(10, 12)]


def test_sinking_reads_the_device_once_per_chunk_at_most_and_only_for_listeners():
    def syncs(batches, logger=None):
        x, y = make_data(batches * 4)
        trainer = quiet_trainer(max_epochs=2, sink_size=5, logger=logger or False, log_every_n_steps=2)
        trainer.fit(fresh_model(), batches_of(x, y, 4))
        return trainer.host_sync_count

    assert syncs(10) == syncs(40) <= 6  # nobody listens: epoch ends only
    # a logger at every other step: one history read per chunk (2 epochs of 8 chunks of 5); the last
    # chunk's read also serves the epoch end's read of the last step values
    logger = RecordingLogger()
    assert syncs(40, logger) - syncs(40) == 2 * 8 - 2
    assert [step for step, m in logger.metrics if "loss" in m][:3] == [2, 4, 6]


class DictRegressor(AdamLogger):
    """AdamLogger's maths on batches that are dicts {"x": ..., "y": ...}."""

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["y"]
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss


@pytest.mark.parametrize("form", ["tensors", "dict", "mixed"])
def test_sinking_stacks_tensor_leaves_and_dicts_like_numpy_batches(form):
    # A chunk is stacked from each leaf as it came: numpy arrays (the other tests) or Tensors, in a tuple or
    # a dict; "mixed" has Tensor inputs and numpy targets in one batch.
    x, y = make_data(100)
    numpy_batches = batches_of(x, y, 8)
    if form == "tensors":
        batches, cls = [(ms.Tensor(bx), ms.Tensor(by)) for bx, by in numpy_batches], AdamLogger
    elif form == "dict":
        batches, cls = [{"x": bx, "y": ms.Tensor(by)} for bx, by in numpy_batches], DictRegressor
    else:
        batches, cls = [(ms.Tensor(bx), by) for bx, by in numpy_batches], AdamLogger
    base = fresh_model(cls=AdamLogger)
    quiet_trainer(max_epochs=2, logger=False, enable_checkpointing=False).fit(base, numpy_batches)
    model = fresh_model(cls=cls)
    trainer = quiet_trainer(max_epochs=2, sink_size=5, logger=False, enable_checkpointing=False)
    trainer.fit(model, batches)
    assert trainer.global_step == 26
    assert_same_parameters(base, model)


def test_stack_buffers_are_reused_only_when_nothing_else_holds_them():
    from lightms.trainer.chunks import StackBuffers
    from mindspore import Tensor

    pool = StackBuffers(keep=2)
    leaves = [np.zeros((8, 6), np.float32), np.zeros(8, np.int32)]
    first = pool.take(leaves, 4)
    assert [b.shape for b in first] == [(4, 8, 6), (4, 8)] and first[1].dtype == np.int32
    second = pool.take(leaves, 4)
    assert second is not first  # the set handed out last may still be filling
    assert pool.take(leaves, 4) is first and pool.take(leaves, 4) is second  # two sets take turns
    kept = Tensor.from_numpy(first[0][2])  # a row a hook was given and kept
    third = pool.take(leaves, 4)
    assert third is not first and third is not second  # first is held, second was handed out last
    assert pool.take(leaves, 4) is second
    view = second[1][:2]  # MindSpore keeps the last call's inputs: slices of the buffers
    fourth = pool.take(leaves, 4)
    assert fourth is not first and fourth is not second
    del view
    assert pool.take(leaves, 4) is second
    smaller = [np.zeros((3, 6), np.float32), np.zeros(3, np.int32)]  # an epoch's smaller last batch
    odd = pool.take(smaller, 4)
    assert [b.shape for b in odd] == [(4, 3, 6), (4, 3)] and odd is not first  # first is still held
    del kept
    assert pool.take(leaves, 4) is first
    odd_again = pool.take(smaller, 4)  # replaces the unheld set of the other shapes (second) in the pool
    assert pool.take(leaves, 4) is first and pool.take(smaller, 4) is odd_again


def test_a_batch_a_hook_keeps_under_sinking_never_changes(monkeypatch):
    from lightms.trainer.chunks import StackBuffers

    import weakref

    taken, reused = [], []  # weak references: holding the buffers would keep them from reuse
    take = StackBuffers.take

    def recording(self, leaves, length):
        buffers = take(self, leaves, length)
        reused.append(any(ref() is buffers[0] for ref in taken))
        taken.append(weakref.ref(buffers[0]))
        return buffers

    monkeypatch.setattr(StackBuffers, "take", recording)

    class Keeper(Callback):
        def __init__(self, keep):
            self.keep, self.kept = keep, []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.keep:
                self.kept += list(batch)

    x, y = make_data(96)
    batches = batches_of(x, y, 8)  # 12 batches: 4 chunks of 3 per epoch
    for keep in (True, False):
        taken.clear()
        reused.clear()
        keeper = Keeper(keep)
        quiet_trainer(max_epochs=2, sink_size=3, callbacks=[keeper]).fit(fresh_model(), batches)
        assert len(reused) == 8
        if keep:
            kept = [(bx.asnumpy(), by.asnumpy()) for bx, by in keeper.kept]
            assert len(kept) == 24
            for (kx, ky), (bx, by) in zip(kept, batches * 2):  # what was kept still holds its batch...
                np.testing.assert_array_equal(kx, bx)
                np.testing.assert_array_equal(ky, by)
            assert not any(reused)  # ...as every kept chunk got new buffers
        else:
            assert reused == [False] * 2 + [True] * 6  # two sets take turns: one filled while MindSpore holds the other


# ---- how a graph receives batches ----

def test_flat_tuples_and_lists_of_tensors_go_in_as_separate_tensors():
    x, y = Tensor(np.ones((2, 3), np.float32)), Tensor(np.zeros((2,), np.int32))
    passing = chunks.batch_passing((x, y), compiled=True)
    assert passing.pack((x, y)) == (x, y)  # no mutable wrapper: the Tensors themselves
    assert passing.unpack(x, y) == (x, y)
    as_list = chunks.batch_passing([x, y], compiled=True)
    assert as_list.unpack(*as_list.pack([x, y])) == [x, y]
    alone = chunks.batch_passing(x, compiled=True)
    assert alone.pack(x) == (x,) and alone.unpack(x) is x


def test_other_batches_go_in_as_one_mutable_input_and_eager_steps_get_the_batch_as_is():
    x = Tensor(np.ones((2, 3), np.float32))
    for batch in ({"x": x}, ((x, x), x)):
        (packed,) = chunks.batch_passing(batch, compiled=True).pack(batch)
        assert getattr(packed, "__ms_mutable__", False) and packed == batch
    eager = chunks.batch_passing((x, x), compiled=False)
    batch = (x, x)
    assert eager.unpack(*eager.pack(batch)) is batch
