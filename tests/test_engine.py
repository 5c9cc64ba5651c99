"""The training engine: exact accumulation, partial windows, clipping, compiled == eager, counters, and the engine
run without a Trainer against a hand-written loop."""

import sys

import numpy as np
import pytest
from mindspore import Tensor, ops

from lightms.callbacks import Callback
from lightms.engine import engine as engine_module

from conftest import (RecordingLogger, TinyRegressor, batches_of, fresh_model, make_data, parameters_of,
                      quiet_trainer, reference_sgd)


def assert_same_parameters(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


def test_accumulate_4_of_32_equals_accumulate_1_of_128():
    x, y = make_data(512)
    small = fresh_model()
    quiet_trainer(max_epochs=2, accumulate=4).fit(small, batches_of(x, y, 32))
    big = fresh_model()
    quiet_trainer(max_epochs=2, accumulate=1).fit(big, batches_of(x, y, 128))
    assert_same_parameters(parameters_of(small), parameters_of(big), atol=1e-5)
    # ...and both equal a hand-written MindSpore loop on the batches of 128.
    reference = fresh_model()
    reference_sgd(reference, [[b] for b in batches_of(x, y, 128)] * 2, lr=0.1)
    assert_same_parameters(parameters_of(big), parameters_of(reference), atol=1e-5)
    # The parameters moved: the comparison is not between two untouched models.
    assert not np.allclose(parameters_of(big)["net.0.weight"], parameters_of(fresh_model())["net.0.weight"])


@pytest.mark.parametrize("compile", [True, False])
def test_partial_last_window_is_the_mean_of_its_batches(compile):
    # 6 batches with accumulate=4: windows [b0..b3] and [b4, b5]; the second is divided by 2, not 4.
    x, y = make_data(6 * 16)
    batches = batches_of(x, y, 16)
    model = fresh_model()
    trainer = quiet_trainer(max_epochs=2, accumulate=4, compile=compile)
    trainer.fit(model, batches)
    assert trainer.global_step == 4  # ceil(6 / 4) per epoch
    reference = fresh_model()
    reference_sgd(reference, [batches[:4], batches[4:]] * 2, lr=0.1)
    assert_same_parameters(parameters_of(model), parameters_of(reference), atol=1e-5)


class StopsAtBatch4(TinyRegressor):
    """Ends the epoch from on_train_batch_start at batch 4."""

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 4 else None


@pytest.mark.parametrize("sink_size", [1, 2])
def test_epoch_ended_inside_a_window_closes_it_with_its_own_size(sink_size):
    # accumulate=3: batch 4 is the second of window [b3, b4, b5]. Returning -1 there finishes the window
    # with b4 (a window of 2, divided by 2) and ends the epoch: windows [b0..b2], [b3, b4].
    x, y = make_data(8 * 16)
    batches = batches_of(x, y, 16)
    model = fresh_model(cls=StopsAtBatch4)
    trainer = quiet_trainer(max_epochs=1, accumulate=3, sink_size=sink_size)
    with pytest.warns(UserWarning, match="inside an accumulation window"):
        trainer.fit(model, batches)
    assert trainer.global_step == 2
    reference = fresh_model()
    reference_sgd(reference, [batches[:3], batches[3:5]], lr=0.1)
    assert_same_parameters(parameters_of(model), parameters_of(reference), atol=1e-6)


def test_compiled_equals_eager():
    x, y = make_data(200)
    batches = batches_of(x, y, 32)  # last batch of 8
    results = []
    for compile in (True, False):
        model = fresh_model()
        trainer = quiet_trainer(max_epochs=2, accumulate=3, compile=compile, gradient_clip_val=0.5)
        trainer.fit(model, batches)
        results.append((parameters_of(model), trainer.callback_metrics["loss"], trainer.global_step))
    assert_same_parameters(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)
    assert results[0][2] == results[1][2] == 6


def _numpy_clip_norm(grads, max_norm):
    norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads))
    scale = min(1.0, max_norm / norm)
    return [g * scale for g in grads]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_matches_numpy(algorithm):
    import mindspore as ms

    x, y = make_data(64)
    batches = batches_of(x, y, 32)
    model = fresh_model()
    quiet_trainer(max_epochs=1, accumulate=2, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm).fit(
        model, batches)
    # Reference: mean gradient of the two batches from MindSpore, clipped in numpy, applied by hand.
    reference = fresh_model()
    weights = reference.trainable_params()
    grad_fn = ms.grad(lambda_free_loss(reference), None, weights)
    grads = [np.zeros(p.shape, np.float32) for p in weights]
    for bx, by in batches:
        for acc, g in zip(grads, grad_fn(ms.Tensor(bx), ms.Tensor(by))):
            acc += g.asnumpy() / 2
    clipped = _numpy_clip_norm(grads, 0.05) if algorithm == "norm" else [np.clip(g, -0.05, 0.05) for g in grads]
    expected = {p.name: p.asnumpy() - 0.1 * g for p, g in zip(weights, clipped)}
    assert_same_parameters(parameters_of(model), expected, atol=1e-6)
    assert any(not np.allclose(g, c) for g, c in zip(grads, clipped))  # clipping did something


def lambda_free_loss(model):
    def loss_fn(x, y):
        return ((model.net(x) - y) ** 2).mean()
    return loss_fn


def test_optimizer_step_counter_advances_once_per_update():
    from mindspore import nn

    class AdamRegressor(TinyRegressor):
        def configure_optimizers(self):
            return nn.Adam(self.trainable_params(), learning_rate=1e-3)

    x, y = make_data(10 * 8)
    model = fresh_model(cls=AdamRegressor)
    trainer = quiet_trainer(max_epochs=2, accumulate=4)
    trainer.fit(model, batches_of(x, y, 8))
    optimizer = trainer.optimizers[0]
    assert trainer.global_step == 6
    assert int(optimizer.global_step.asnumpy()) == 6
    # Adam's bias corrections are powers of beta with one factor per real update.
    assert float(optimizer.beta1_power.asnumpy()) == pytest.approx(0.9 ** 6, rel=1e-5)


def _seen_step(module):
    """A plain function outside the module's class that reads its counters (as a helper library would)."""
    return module.global_step * 1.0 + module.current_epoch * 100.0


class ReadsCountersElsewhere(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("seen", _seen_step(self), reduce_fx="max", on_epoch=True)
        self.log("idx", batch_idx * 1.0, reduce_fx="max", on_epoch=True)
        return ((self(x) - y) ** 2).mean()


@pytest.mark.parametrize("sink_size, accumulate", [(1, 1), (1, 2), (3, 2)])
def test_counters_are_right_wherever_the_code_reads_them(sink_size, accumulate):
    x, y = make_data(48)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_epochs=2, sink_size=sink_size, accumulate=accumulate, logger=logger,
                            log_every_n_steps=1)
    trainer.fit(fresh_model(cls=ReadsCountersElsewhere), batches_of(x, y, 8))
    steps_per_epoch = 6 // accumulate
    # a step's value is read before its update: the steps taken so far, plus 100 per finished epoch
    expected = [float(s % steps_per_epoch + (s // steps_per_epoch) * steps_per_epoch + 100 * (s // steps_per_epoch))
                for s in range(2 * steps_per_epoch)]
    np.testing.assert_array_equal([v for _, v in logger.values("seen_step")], expected)
    assert trainer.callback_metrics["idx_epoch"] == 5.0  # the epoch's last batch_idx
    assert int(trainer._counters.global_step.asnumpy()) == trainer.global_step == 2 * steps_per_epoch


def test_the_loss_sum_turns_non_finite_with_any_non_finite_loss_and_stays_so():
    from lightms._mindspore import mindspore as ms
    from mindspore import Tensor, ops
    from lightms.engine.engine import Counters, compile_function

    counters = Counters()

    def add_loss(loss):
        return ops.assign_add(counters.loss_sum, loss)

    add = compile_function(add_loss, True)
    for value in (1.5, -0.25, 2.0):
        add(Tensor(value, ms.float32))
    assert float(counters.loss_sum.asnumpy()) == 3.25
    add(Tensor(np.inf, ms.float32))
    add(Tensor(-np.inf, ms.float32))  # inf - inf: NaN, still not finite
    add(Tensor(1.0, ms.float32))
    assert not np.isfinite(counters.loss_sum.asnumpy())


@pytest.mark.parametrize("sink_length", [1, 3])
def test_the_engine_runs_without_a_trainer_like_a_hand_written_loop(sink_length):
    """TrainEngine and ChunkPlanner alone, on 7 batches with accumulate=2: windows [0 1] [2 3] [4 5] [6]."""
    from mindspore import nn
    from lightms import LightningCell
    from lightms.engine import Counters, TrainEngine, plan_training
    from lightms.engine.binding import ModuleBinding
    from lightms.precision.precision import resolve_precision
    from lightms.trainer.chunks import ChunkPlanner
    from lightms.trainer.data import DataSource

    x, y = make_data(56)
    batches = batches_of(x, y, 8)
    module = fresh_model()
    optimizer = nn.SGD(module.trainable_params(), learning_rate=0.1)
    source = DataSource(batches, "batches")
    planner = ChunkPlanner(accumulate=2, sink_length=sink_length, host_needed=lambda step, batch: False,
                           steps_done=lambda: 0)
    counters = Counters()
    engine, steps, losses = None, 0, []
    with ModuleBinding(module, None, LightningCell) as binding:  # self(x) and self.log inside the graphs
        binding.use_counters(counters)
        for chunk in planner.chunks(source.batches(), window=0):
            if engine is None:
                precision = resolve_precision("32-true")
                plan = plan_training(module, chunk.batches[0], [optimizer], accumulate=2, sink_length=sink_length,
                                     clip_val=None, clip_algorithm="norm", precision=precision, step_history=False,
                                     compile=True)
                engine = TrainEngine(module, optimizer, plan, counters, binding.inside, chunk.batches[0])
            report = engine.run(chunk)
            steps += report.steps
            losses.append(float(report.loss.asnumpy()))
    assert steps == 4 and int(counters.global_step.asnumpy()) == 4
    assert int(counters.batch_idx.asnumpy()) == 7
    reference = fresh_model()
    reference_sgd(reference, [batches[0:2], batches[2:4], batches[4:6], batches[6:]], lr=0.1)
    assert_same_parameters(parameters_of(module), parameters_of(reference), atol=1e-6)
    assert "2 micro-batch(es) per optimizer step" in str(engine.plan)


class ReturnsMore(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        prediction = self(x)
        loss = ((prediction - y) ** 2).mean()
        return {"loss": loss, "prediction": prediction, "xsum": x.sum()}


class OutputsSeen(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.outputs.append({key: value.asnumpy().copy() for key, value in outputs.items()})


@pytest.mark.parametrize("sink_size, accumulate, compile", [(1, 1, True), (1, 2, True), (3, 2, True), (1, 1, False)])
def test_the_extra_keys_training_step_returns_reach_on_train_batch_end(sink_size, accumulate, compile):
    x, y = make_data(48)
    batches = batches_of(x, y, 8)
    seen = OutputsSeen()
    quiet_trainer(max_epochs=1, sink_size=sink_size, accumulate=accumulate, compile=compile,
                  callbacks=[seen]).fit(fresh_model(cls=ReturnsMore), batches)
    # per chunk: the values of its last micro-batch
    lasts = [2, 5] if sink_size == 3 else list(range(6))
    assert [sorted(o) for o in seen.outputs] == [["loss", "prediction", "xsum"]] * len(lasts)
    for outputs, index in zip(seen.outputs, lasts):
        np.testing.assert_allclose(outputs["xsum"], batches[index][0].sum(), rtol=1e-5)
        assert outputs["prediction"].shape == (8, 1)
        np.testing.assert_allclose(outputs["loss"], ((outputs["prediction"] - batches[index][1]) ** 2).mean(),
                                   rtol=1e-5)


class FreezesTheFirstLayer(TinyRegressor):
    """Freezes net.0 in on_train_start (after configure_optimizers, which got all parameters)."""

    def configure_optimizers(self):
        from mindspore import nn

        return nn.SGD(self.trainable_params(), learning_rate=0.1, momentum=0.9, weight_decay=0.01)

    def on_train_start(self):
        for p in self.net[0].get_parameters():
            p.requires_grad = False


class Unfreeze(Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            for p in module.net[0].get_parameters():
                p.requires_grad = True


@pytest.mark.parametrize("sink_size", [1, 3])
def test_parameters_frozen_after_configure_optimizers_do_not_move(sink_size):
    from mindspore import nn

    x, y = make_data(48)
    batches = batches_of(x, y, 8)
    def all_parameters(model):
        return {p.name: p.asnumpy().copy() for p in model.get_parameters()}

    model = fresh_model(cls=FreezesTheFirstLayer)
    start = all_parameters(model)
    quiet_trainer(max_epochs=1, sink_size=sink_size).fit(model, batches)
    frozen = {name: value for name, value in start.items() if name.startswith("net.0")}
    assert len(frozen) == 2
    for name, value in frozen.items():  # weight decay and momentum would move them: they are kept
        np.testing.assert_array_equal(all_parameters(model)[name], value)
    slots = {p.name: p.asnumpy() for p in trainer_of(model).optimizers[0].get_parameters()
             if p.name.split(".", 1)[-1] in frozen and p.name not in frozen}
    assert sorted(slots) == ["accum.net.0.bias", "accum.net.0.weight", "stat.net.0.bias", "stat.net.0.weight"]
    assert all(not value.any() or name.startswith("stat") for name, value in slots.items())  # no momentum built up
    # the others trained as if the optimizer had only them (a hand-written loop over net.2)
    reference = fresh_model()
    weights = reference.net[2].trainable_params()
    optimizer = nn.SGD(weights, learning_rate=0.1, momentum=0.9, weight_decay=0.01)
    grad_fn = ms_grad(reference, weights)
    for bx, by in batches:
        optimizer(grad_fn(Tensor(bx), Tensor(by)))
    for p in weights:
        np.testing.assert_allclose(parameters_of(model)[p.name], p.asnumpy(), atol=1e-6, rtol=0)
    # unfrozen at the next epoch start (as a fine-tuning callback does): the step is rebuilt and they train
    trainer = quiet_trainer(max_epochs=2, sink_size=sink_size, callbacks=[Unfreeze()])
    model = fresh_model(cls=FreezesTheFirstLayer)
    trainer.fit(model, batches)
    assert not np.allclose(all_parameters(model)["net.0.weight"], start["net.0.weight"])
    assert trainer._engine.plan.frozen == ()


def trainer_of(model):
    return model.trainer


def ms_grad(model, weights):
    from lightms._mindspore import mindspore as ms

    def loss_fn(x, y):
        return ((model.net(x) - y) ** 2).mean()

    return ms.grad(loss_fn, None, weights)


# ---- whole-graph step functions: one memory release per compilation; each batch form ----


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
    assert engine_module.release_freed_memory() is True
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert all(float(block[0]) == 1.0 for block in kept)  # live blocks are untouched


def double(x):
    return ops.mul(x, 2.0)


def test_memory_is_released_once_per_compiled_graph(monkeypatch):
    releases = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: releases.append(1))
    run = engine_module.compile_function(double, compile=True)
    np.testing.assert_allclose(run(Tensor(np.ones((2, 3), np.float32))).asnumpy(), 2.0)
    assert len(releases) == 1
    run(Tensor(np.zeros((2, 3), np.float32)))  # same signature: MindSpore's cached graph, no compile
    assert len(releases) == 1
    run(Tensor(np.ones((4, 3), np.float32)))  # a new shape compiles a second graph
    assert len(releases) == 2


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
    run = engine_module.compile_function(broken, True, explain)
    with pytest.raises(TypeError, match="named by lightms"):  # compiling fails: explained
        run(ones)
    assert len(shown) == 1 and "named by lightms" not in str(shown[0])
    run = engine_module.compile_function(double, True, explain)
    run(ones)  # compiles and runs once

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(nn.Cell, "compile_and_run", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):  # a graph that ran before: MindSpore's own
        run(ones)
    assert len(shown) == 1


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_sunk_extra_outputs_follow_a_smaller_last_batch_and_autocast(precision):
    x, y = make_data(44)
    batches = batches_of(x, y, 8)  # 5 batches of 8 and one of 4: chunks [0 1 2] [3 4] [5]
    seen = OutputsSeen()
    quiet_trainer(max_epochs=1, sink_size=3, precision=precision, callbacks=[seen]).fit(
        fresh_model(cls=ReturnsMore), batches)
    assert [o["prediction"].shape for o in seen.outputs] == [(8, 1), (8, 1), (4, 1)]
    for outputs, index in zip(seen.outputs, [2, 4, 5]):
        np.testing.assert_allclose(outputs["xsum"], batches[index][0].sum(), rtol=1e-2 if precision != "32-true" else 1e-5)
