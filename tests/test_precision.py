"""Precision: the names, loss scaling with skipped overflow steps, checkpoints, and accuracy on digits."""

import importlib.util
import os
import sys

import numpy as np
import pytest

import lightms
from lightms.callbacks import ModelCheckpoint
from lightms.precision import resolve_precision
from lightms._mindspore import mindspore as ms
from mindspore import nn
from conftest import (AdamRegressor, StepDecayRegressor, TinyRegressor, batches_of, fresh_model, make_data,
                      parameters_of, quiet_trainer)

ON_CPU = ms.get_context("device_target") == "CPU"


def test_precision_names():
    assert resolve_precision(32).is_float32 and resolve_precision("O0").is_float32
    mixed = resolve_precision("16-mixed")
    assert (mixed.dtype, mixed.amp_level, mixed.loss_scaling) == (ms.float16, "auto", True)
    assert resolve_precision(16) == mixed
    assert resolve_precision("16-true").loss_scaling is False
    # as mindspore.train.Model defaults them: dynamic loss scaling at O2 only
    assert [resolve_precision(level).loss_scaling for level in ("O1", "O2", "O3")] == [False, True, False]
    with pytest.raises(ValueError, match=r"precision='fp16'.*'16-mixed'"):
        lightms.Trainer(precision="fp16")


@pytest.mark.skipif(not ON_CPU, reason="the CPU backend has no bfloat16 MatMul in MindSpore 2.10")
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bfloat16_on_cpu_is_refused_by_name(precision):
    with pytest.raises(RuntimeError, match=f"precision='{precision}'.*CPU backend does not have") as error:
        lightms.Trainer(precision=precision)
    assert "C++" not in str(error.value)


def test_an_overflowing_step_is_skipped_and_halves_the_scale():
    x, y = make_data(16)
    poisoned = x.copy()
    poisoned[0, 0] = np.inf
    model = fresh_model(cls=AdamRegressor)
    before = parameters_of(model)
    trainer = quiet_trainer(max_epochs=1, precision="16-mixed")
    trainer.fit(model, [(poisoned[:8], y[:8])])  # the loss stays finite (tanh), the gradients do not
    for name, value in before.items():
        np.testing.assert_array_equal(parameters_of(model)[name], value)
    assert trainer.global_step == 0
    assert int(trainer.optimizers[0].global_step.asnumpy()) == 0  # in-graph schedules read this counter
    assert float(trainer._engine.loss_scaler.scale_value.asnumpy()) == 2.0 ** 15


def test_mixed_keeps_float32_master_weights_and_true_makes_them_half():
    x, y = make_data(16)
    mixed = fresh_model()
    quiet_trainer(max_epochs=1, precision="16-mixed").fit(mixed, batches_of(x, y, 8))
    assert {p.dtype for p in mixed.trainable_params()} == {ms.float32}
    half = fresh_model()
    quiet_trainer(max_epochs=1, precision="16-true").fit(half, batches_of(x, y, 8))
    assert {p.dtype for p in half.trainable_params()} == {ms.float16}


def test_gradients_are_unscaled_before_clipping():
    class PlainSGD(TinyRegressor):
        def configure_optimizers(self):
            return nn.SGD(self.trainable_params(), learning_rate=1.0)

    x, y = make_data(64)
    model = fresh_model(cls=PlainSGD)
    before = parameters_of(model)
    trainer = quiet_trainer(max_epochs=1, precision="16-mixed", gradient_clip_val=1e-3,
                            gradient_clip_algorithm="value")
    trainer.fit(model, batches_of(x, y, 8))
    assert trainer.global_step >= 2
    moved = max(np.abs(parameters_of(model)[name] - value).max() for name, value in before.items())
    # each real step moves a weight by at most lr * 1e-3; clipping the scaled gradients (x 2**10 or
    # more) and unscaling afterwards would move them by 1e-6 or less
    assert 0.9e-3 <= moved <= trainer.global_step * 1e-3 * 1.01


def test_skipped_steps_do_not_step_host_schedulers_and_sinking_stays_exact():
    x, y = make_data(48)
    batches = batches_of(x, y, 8)
    batches[2] = (batches[2][0].copy(), batches[2][1])
    batches[2][0][3, 1] = np.inf  # window 2 (batches 2, 3) overflows

    def fit(sink_size):
        model = fresh_model(cls=StepDecayRegressor)
        trainer = quiet_trainer(max_epochs=1, precision="16-mixed", accumulate=2, sink_size=sink_size)
        trainer.fit(model, batches)
        return model, trainer

    model, trainer = fit(1)
    # every skip halves the scale (2 ** 16 at the start; no growth within 2000 steps)
    skipped = 16 - int(np.log2(float(trainer._engine.loss_scaler.scale_value.asnumpy())))
    assert skipped >= 1 and trainer.global_step == 3 - skipped
    lr = float(np.asarray(trainer.optimizers[0].param_groups[0]["lr"].asnumpy()))
    assert lr == pytest.approx(0.1 * 0.5 ** trainer.global_step)  # stepped once per real update only
    sunk, sunk_trainer = fit(3)
    assert sunk_trainer.global_step == trainer.global_step
    for name, value in parameters_of(model).items():
        np.testing.assert_allclose(parameters_of(sunk)[name], value, atol=1e-6, rtol=0)


def test_loss_scaler_state_is_checkpointed_and_restored(tmp_path):
    x, y = make_data(32)
    batches = batches_of(x, y, 8)
    batches[0] = (batches[0][0] * np.float32(np.inf), batches[0][1])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, precision="16-mixed", callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(fresh_model(cls=AdamRegressor), batches)
    scale = float(trainer._engine.loss_scaler.scale_value.asnumpy())
    assert scale <= 2.0 ** 15 and trainer.global_step == 4 - (16 - int(np.log2(scale)))
    saved = ms.load_checkpoint(checkpoint.last_model_path)
    assert float(saved["lightms.loss_scale.scale_value"].asnumpy()) == scale
    counter = int(trainer._engine.loss_scaler.counter.asnumpy())  # finite steps since the last skip
    assert 1 <= counter <= trainer.global_step
    assert int(saved["lightms.loss_scale.counter"].asnumpy()) == counter
    resumed = quiet_trainer(max_epochs=2, precision="16-mixed")  # one more epoch, of finite batches
    resumed.fit(fresh_model(cls=AdamRegressor), batches_of(x, y, 8), ckpt_path=checkpoint.last_model_path)
    assert float(resumed._engine.loss_scaler.scale_value.asnumpy()) == scale  # no overflow: the restored scale
    assert int(resumed._engine.loss_scaler.counter.asnumpy()) == counter + 4  # counting on from the checkpoint


def test_resuming_under_loss_scaling_goes_on_counting_from_the_checkpoint(tmp_path):
    # The step count under loss scaling comes from the device, which must start from the checkpoint's.
    x, y = make_data(32)
    straight, straight_trainer = fresh_model(cls=AdamRegressor), quiet_trainer(max_epochs=2, precision="16-mixed")
    straight_trainer.fit(straight, batches_of(x, y, 8))  # the first steps overflow at the initial scale
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))
    quiet_trainer(max_epochs=1, precision="16-mixed", callbacks=[checkpoint], enable_checkpointing=True).fit(
        fresh_model(cls=AdamRegressor), batches_of(x, y, 8))
    resumed = quiet_trainer(max_epochs=2, precision="16-mixed")
    model = fresh_model(cls=AdamRegressor)
    resumed.fit(model, batches_of(x, y, 8), ckpt_path=checkpoint.last_model_path)
    assert resumed.global_step == straight_trainer.global_step > 0
    for name, value in parameters_of(straight).items():
        np.testing.assert_allclose(parameters_of(model)[name], value, atol=1e-6, rtol=0)


def test_16_true_warns_when_adam_eps_is_zero_in_float16():
    class DefaultAdam(TinyRegressor):
        def configure_optimizers(self):
            return nn.Adam(self.trainable_params(), learning_rate=1e-3)  # eps=1e-8

    x, y = make_data(16)
    with pytest.warns(UserWarning, match="eps=1e-08 is 0 in float16"):
        quiet_trainer(max_epochs=1, precision="16-true").fit(fresh_model(cls=DefaultAdam), batches_of(x, y, 8))


def test_o1_leaves_no_rewritten_network_folder_in_the_working_directory(tmp_path):
    x, y = make_data(16)
    trainer = quiet_trainer(max_epochs=1, precision="O1")
    trainer.fit(fresh_model(), batches_of(x, y, 8))
    trainer.validate(trainer.model, batches_of(x, y, 8))  # a later compile still finds the rewritten code
    assert os.listdir(tmp_path) == []


def test_a_module_converted_for_one_precision_is_not_reused_for_another():
    x, y = make_data(16)
    model = fresh_model()
    quiet_trainer(max_epochs=1, precision="O2").fit(model, batches_of(x, y, 8))
    quiet_trainer(max_epochs=1, precision="O2").fit(model, batches_of(x, y, 8))  # same: fine
    for other in ("O3", "32-true"):
        with pytest.raises(ValueError, match="already converted for Trainer\\(precision='O2'\\)"):
            quiet_trainer(max_epochs=1, precision=other).fit(model, batches_of(x, y, 8))


class TwoNets(TinyRegressor):
    """Two sub-cells of the same structure: their parameters differ only by prefix."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)
        self.head = nn.SequentialCell(nn.Dense(1, 8), nn.Tanh(), nn.Dense(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.head(self(x)) - y) ** 2).mean()
        self.log("loss", loss)
        return loss


@pytest.mark.parametrize("precision", ["O1", "O2", "O3", "16-true"])
def test_converted_modules_keep_their_parameter_names_and_checkpoints_load_into_float32(tmp_path, precision):
    x, y = make_data(16)
    model = fresh_model(cls=TwoNets)
    names = [p.name for p in model.get_parameters()]
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path))
    quiet_trainer(max_epochs=1, precision=precision, callbacks=[checkpoint],
                  enable_checkpointing=True).fit(model, batches_of(x, y, 8))
    assert [p.name for p in model.get_parameters()] == names
    restored = TwoNets.load_from_checkpoint(checkpoint.last_model_path)
    for name, value in parameters_of(model).items():
        np.testing.assert_allclose(parameters_of(restored)[name], value.astype(np.float32), rtol=0, atol=0)


def test_16_true_leaves_integer_buffers_alone():
    class WithCounter(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.seen = ms.Parameter(ms.Tensor(0, ms.int32), name="seen", requires_grad=False)

    x, y = make_data(16)
    model = fresh_model(cls=WithCounter)
    quiet_trainer(max_epochs=1, precision="16-true").fit(model, batches_of(x, y, 8))
    assert model.seen.dtype == ms.int32 and model.net[0].weight.dtype == ms.float16


def test_16_mixed_autocasts_direct_sub_cell_calls_alike_eager_and_compiled():
    class Probe(lightms.LightningCell):
        def __init__(self):
            super().__init__()
            self.net = nn.Dense(1, 1, weight_init="ones", has_bias=False)

        def construct(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, = batch
            self.log("via_self", self(x).mean() - 1.0)
            self.log("via_subcell", self.net(x).mean() - 1.0)  # not through self(x)
            return ((self.net(x) - 1.0) ** 2).mean()

        def configure_optimizers(self):
            return nn.SGD(self.trainable_params(), learning_rate=0.0)

    x = np.full((4, 1), 1.0001, np.float32)  # 1.0001 is 1.0 in float16
    for compile in (False, True):
        trainer = quiet_trainer(max_epochs=1, precision="16-mixed", compile=compile)
        trainer.fit(Probe(), [(x,)])
        assert trainer.callback_metrics == {"via_self": 0.0, "via_subcell": 0.0}
    trainer = quiet_trainer(max_epochs=1, compile=True)
    trainer.fit(Probe(), [(x,)])
    assert trainer.callback_metrics["via_subcell"] == pytest.approx(1e-4, rel=1e-2)


# ---- accuracy: the README example's MLP on digits, float32 against each precision the backend runs --------

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.py")
RUNNABLE = ["16-mixed", "16-true", "O1", "O2", "O3"]
if not ON_CPU:
    RUNNABLE += ["bf16-mixed", "bf16-true"]


@pytest.fixture(scope="module")
def digits_accuracy(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("digits_precision", EXAMPLE)
    digits = importlib.util.module_from_spec(spec)
    sys.modules["digits_precision"] = digits
    spec.loader.exec_module(digits)
    results = {}

    def accuracy(precision):
        if precision not in results:
            root = tmp_path_factory.mktemp(precision)
            cwd = os.getcwd()
            os.chdir(root)
            try:
                results[precision] = digits.main(["--root", str(root), "--precision", precision, "--epochs", "15",
                                                  "--sink-size", "epoch"])
            finally:
                os.chdir(cwd)
        return results[precision]

    yield accuracy
    del sys.modules["digits_precision"]


@pytest.mark.parametrize("precision", RUNNABLE)
def test_digits_accuracy_within_two_points_of_float32(digits_accuracy, precision):
    reference = digits_accuracy("32-true")
    assert reference >= 0.95
    assert digits_accuracy(precision) >= reference - 0.02
