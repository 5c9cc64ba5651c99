"""Whole-graph step functions: one memory release per compilation, and what the release gives back."""

import sys

import numpy as np
import pytest
from mindspore import Tensor, ops

from lightms.step import graph


def resident_mib() -> float:
    """The process's resident memory now, from the kernel's own accounting."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_release_returns_freed_heap_pages_to_the_system():
    # 200 MiB in 64 KiB blocks (below glibc's mmap threshold, so they live on the heap); every
    # 16th block stays alive, so the freed pages sit between live ones, where free() keeps them.
    blocks = [np.ones(16 * 1024, np.float32) for _ in range(3200)]
    kept = blocks[::16]
    del blocks
    before = resident_mib()
    assert graph.release_freed_memory() is True
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert all(float(block[0]) == 1.0 for block in kept)  # live blocks are untouched


def double(x):
    return ops.mul(x, 2.0)


def test_memory_is_released_once_per_compiled_graph(monkeypatch):
    releases = []
    monkeypatch.setattr(graph, "release_freed_memory", lambda: releases.append(1))
    run = graph.compile_function(double, compile=True)
    np.testing.assert_allclose(run(Tensor(np.ones((2, 3), np.float32))).asnumpy(), 2.0)
    assert len(releases) == 1
    run(Tensor(np.zeros((2, 3), np.float32)))  # same signature: MindSpore's cached graph, no compile
    assert len(releases) == 1
    run(Tensor(np.ones((4, 3), np.float32)))  # a new shape compiles a second graph
    assert len(releases) == 2


def test_flat_tuples_and_lists_of_tensors_go_in_as_separate_tensors():
    x, y = Tensor(np.ones((2, 3), np.float32)), Tensor(np.zeros((2,), np.int32))
    passing = graph.batch_passing((x, y), compiled=True)
    assert passing.pack((x, y)) == (x, y)  # no mutable wrapper: the Tensors themselves
    assert passing.unpack(x, y) == (x, y)
    as_list = graph.batch_passing([x, y], compiled=True)
    assert as_list.unpack(*as_list.pack([x, y])) == [x, y]
    alone = graph.batch_passing(x, compiled=True)
    assert alone.pack(x) == (x,) and alone.unpack(x) is x


def test_other_batches_go_in_as_one_mutable_input_and_eager_steps_get_the_batch_as_is():
    x = Tensor(np.ones((2, 3), np.float32))
    for batch in ({"x": x}, ((x, x), x)):
        (packed,) = graph.batch_passing(batch, compiled=True).pack(batch)
        assert getattr(packed, "__ms_mutable__", False) and packed == batch
    eager = graph.batch_passing((x, x), compiled=False)
    batch = (x, x)
    assert eager.unpack(*eager.pack(batch)) is batch


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "nested"])
def test_each_batch_form_compiles_once_and_trains_and_validates_like_hand_written_mindspore(form):
    import lightms
    import mindspore as ms
    from mindspore import nn
    from conftest import batches_of, fresh_model, make_data, quiet_trainer, TinyRegressor
    from lightms.callbacks import Callback

    def unpacked(batch):
        if form == "dict":
            return batch["x"], batch["y"]
        if form == "nested":
            return batch[0][0], batch[1]
        return batch[0], batch[1]

    class AnyForm(TinyRegressor):
        def training_step(self, batch, batch_idx):
            x, y = unpacked(batch)
            return ((self(x) - y) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            x, y = unpacked(batch)
            self.log("val_loss", ((self(x) - y) ** 2).mean())

    def shaped(bx, by):
        return {"tuple": (bx, by), "list": [bx, by], "dict": {"x": bx, "y": by}, "nested": ((bx,), by)}[form]

    counts = []

    class CountCompiles(Callback):
        def on_train_epoch_end(self, trainer, module):
            counts.append(lightms.compiled_graph_count())

    x, y = make_data(40)
    val_x, val_y = make_data(16, seed=1)
    model = fresh_model(cls=AnyForm)
    reference = fresh_model()
    trainer = quiet_trainer(max_epochs=3, accumulate=2, callbacks=[CountCompiles()])
    trainer.fit(model, [shaped(bx, by) for bx, by in batches_of(x, y, 8)],
                [shaped(bx, by) for bx, by in batches_of(val_x, val_y, 8)])
    assert counts[1:] == [counts[0]] * 2  # window, optimizer and validation steps compile once each

    # The same by hand, eagerly: windows of 2 micro-batches (the epoch's last has 1); SGD on their mean gradient.
    weights = reference.trainable_params()
    grad_fn = ms.value_and_grad(lambda bx, by: ((reference(bx) - by) ** 2).mean(), None, weights)
    optimizer = nn.SGD(weights, learning_rate=0.1)
    batches = batches_of(x, y, 8)
    for _ in range(3):
        for start in range(0, len(batches), 2):
            window = [grad_fn(Tensor(bx), Tensor(by))[1] for bx, by in batches[start:start + 2]]
            optimizer(tuple(sum(g) / len(window) for g in zip(*window)))
    for mine, theirs in zip(model.trainable_params(), weights):
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), atol=1e-6)
    val_loss = np.mean([float(((reference(Tensor(bx)) - Tensor(by)) ** 2).mean().asnumpy())
                        for bx, by in batches_of(val_x, val_y, 8)])
    assert trainer.callback_metrics["val_loss"] == pytest.approx(val_loss, abs=1e-6)


def broken(x):
    return ops.mul(x, "two")  # MindSpore's compiler refuses a string operand


def test_only_a_new_graph_failure_is_shown_to_explain_failure(monkeypatch):
    from mindspore import nn

    shown = []

    def explain(error):
        shown.append(error)
        return TypeError("named by lightms")

    ones = Tensor(np.ones((2, 3), np.float32))
    run = graph.compile_function(broken, True, explain)
    with pytest.raises(TypeError, match="named by lightms"):  # compiling fails: explained
        run(ones)
    assert len(shown) == 1 and "named by lightms" not in str(shown[0])
    run = graph.compile_function(double, True, explain)
    run(ones)  # compiles and runs once

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(nn.Cell, "compile_and_run", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):  # a graph that ran before: MindSpore's own
        run(ones)
    assert len(shown) == 1
