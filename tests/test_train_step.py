"""The compiled train step: exact accumulation, partial windows, clipping, compiled == eager, device counters."""

import numpy as np
import pytest

from conftest import (TinyRegressor, batches_of, fresh_model, make_data, parameters_of, quiet_trainer,
                      reference_sgd)


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


def test_device_counters_are_kept_only_when_the_module_reads_them():
    from lightms.step.binding import reads_argument

    class ReadsBoth(TinyRegressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = ((self(x) - y) ** 2).mean()
            self.log("idx", batch_idx * 1.0, reduce_fx="max", on_epoch=True)
            self.log("step", self.global_step * 1.0, reduce_fx="max", on_epoch=True)
            return loss

    assert not reads_argument(TinyRegressor.training_step, 2) and reads_argument(ReadsBoth.training_step, 2)
    x, y = make_data(40)
    plain = quiet_trainer(max_epochs=1)
    plain.fit(fresh_model(), batches_of(x, y, 8))
    # nobody reads them: the step graph neither feeds batch_idx nor advances global_step on the device
    assert int(plain._counters.batch_idx.asnumpy()) == 0 and int(plain._counters.global_step.asnumpy()) == 0
    reading = quiet_trainer(max_epochs=1)
    reading.fit(fresh_model(cls=ReadsBoth), batches_of(x, y, 8))
    assert int(reading._counters.batch_idx.asnumpy()) == 5 and int(reading._counters.global_step.asnumpy()) == 5
    assert reading.callback_metrics["idx"] == 4.0 and reading.callback_metrics["step"] == 4.0


def test_the_loss_sum_turns_non_finite_with_any_non_finite_loss_and_stays_so():
    from lightms._mindspore import mindspore as ms
    from mindspore import Tensor
    from lightms.step.graph import compile_function
    from lightms.step.train_step import LoopCounters

    counters = LoopCounters()

    def add_loss(loss):
        return counters.add_loss(loss)

    add = compile_function(add_loss, True)
    for value in (1.5, -0.25, 2.0):
        add(Tensor(value, ms.float32))
    assert float(counters.loss_sum.asnumpy()) == 3.25
    add(Tensor(np.inf, ms.float32))
    add(Tensor(-np.inf, ms.float32))  # inf - inf: NaN, still not finite
    add(Tensor(1.0, ms.float32))
    assert not np.isfinite(counters.loss_sum.asnumpy())
