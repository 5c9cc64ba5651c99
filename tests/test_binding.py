"""ModuleBinding: what a run puts on the module and takes off again; super(), modes, construct's `self`."""

import numpy as np
import pytest
from mindspore import nn

import lightms
from lightms.callbacks import Callback
from conftest import TinyRegressor, batches_of, fresh_model, make_data, parameters_of, quiet_trainer


class ParentStep(TinyRegressor):
    """training_step defined in a parent; the child calls it through super()."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 2.0


class GrandChild(ParentStep):
    def training_step(self, batch, batch_idx):
        return super(GrandChild, self).training_step(batch, batch_idx) * 0.5  # the two-argument form


@pytest.mark.parametrize("compile", [True, False])
def test_super_calls_compile_and_train_like_the_parent_scaled(compile):
    x, y = make_data(32)
    batches = batches_of(x, y, 8)
    models = {}
    for cls, lr in ((TinyRegressor, 0.1), (ParentStep, 0.05), (GrandChild, 0.1)):  # loss x2 at half the rate
        model = fresh_model(cls=cls, lr=lr)
        quiet_trainer(max_epochs=2, compile=compile).fit(model, batches)
        models[cls] = parameters_of(model)
    for cls in (ParentStep, GrandChild):
        for name, value in models[TinyRegressor].items():
            np.testing.assert_allclose(models[cls][name], value, atol=1e-6, rtol=0)


def test_a_subclass_can_switch_validation_off_with_none():
    class NoValidation(TinyRegressor):
        validation_step = None

    x, y = make_data(16)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=2)
    trainer.fit(fresh_model(cls=NoValidation), batches_of(x, y, 8), batches_of(x, y, 8))
    assert trainer.global_step == 2 and "val_loss" not in trainer.callback_metrics
    with pytest.raises(NotImplementedError, match="Trainer.validate needs NoValidation.validation_step"):
        trainer.validate(fresh_model(cls=NoValidation), batches_of(x, y, 8))


def test_a_construct_whose_first_parameter_is_not_self_is_named_before_mindspore_fails():
    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = nn.Dense(6, 1)

        def construct(this, x):
            return this.dense(x)

    class UsesBlock(TinyRegressor):
        def __init__(self, lr=0.1):
            super().__init__(lr)
            self.net = Block()

    x, y = make_data(16)
    with pytest.raises(TypeError, match=r"Block.construct\(this, ...\): .* rename 'this' to 'self'"):
        quiet_trainer(max_epochs=1).fit(fresh_model(cls=UsesBlock), batches_of(x, y, 8))


class FrozenBatchNorm(TinyRegressor):
    """A BatchNorm the user keeps in eval mode (a frozen backbone's), and one that trains."""

    def __init__(self, lr=0.1):
        super().__init__(lr)
        self.frozen = nn.BatchNorm1d(6)
        self.trained = nn.BatchNorm1d(6)

    def construct(self, x):
        return self.net(self.trained(self.frozen(x)))


class ModesSeen(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(("train", module.frozen.training, module.trained.training))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("val", module.frozen.training, module.trained.training))


@pytest.mark.parametrize("where", ["before fit", "on_train_start"])
def test_sub_cells_the_user_put_in_eval_mode_stay_there_and_modes_come_back_after_fit(where):
    x, y = make_data(32)
    model = fresh_model(cls=FrozenBatchNorm)
    mean_before = model.frozen.moving_mean.asnumpy().copy()
    if where == "before fit":
        model.set_train(True)
        model.frozen.set_train(False)
    else:
        model.on_train_start = lambda: model.frozen.set_train(False)
    before = [(name, cell.training) for name, cell in model.cells_and_names()]
    seen = ModesSeen()
    quiet_trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[seen]).fit(model, batches_of(x, y, 8),
                                                                               batches_of(x, y, 16))
    training = [modes for kind, *modes in seen.seen if kind == "train"]
    assert training == [[False, True]] * 8  # the frozen one in eval mode at every step, also after validation
    assert {tuple(modes) for kind, *modes in seen.seen if kind == "val"} == {(False, False)}
    np.testing.assert_array_equal(model.frozen.moving_mean.asnumpy(), mean_before)  # its statistics never moved
    assert not np.allclose(model.trained.moving_mean.asnumpy(), 0.0)  # the other one's did
    assert [(name, cell.training) for name, cell in model.cells_and_names()] == before  # as before fit


def test_a_fresh_module_in_mindspores_default_eval_mode_trains_in_train_mode():
    x, y = make_data(32)
    model = fresh_model(cls=FrozenBatchNorm)
    assert not any(cell.training for _, cell in model.cells_and_names())  # MindSpore's default
    seen = ModesSeen()
    quiet_trainer(max_epochs=1, callbacks=[seen]).fit(model, batches_of(x, y, 8))
    assert {tuple(modes) for kind, *modes in seen.seen} == {(True, True)}
    assert not any(cell.training for _, cell in model.cells_and_names())  # and back after fit


def test_nothing_lightms_put_on_the_module_stays_after_a_run_also_when_it_raises():
    class Fails(TinyRegressor):
        def on_train_epoch_end(self):
            raise RuntimeError("boom")

    x, y = make_data(16)
    for cls, expect_error in ((TinyRegressor, False), (Fails, True)):
        model = fresh_model(cls=cls)
        before = set(vars(model))
        trainer = quiet_trainer(max_epochs=1)
        if expect_error:
            with pytest.raises(RuntimeError, match="boom"):
                trainer.fit(model, batches_of(x, y, 8))
        else:
            trainer.fit(model, batches_of(x, y, 8))
        # no shadow, construct or other lightms attribute left on the instance (set_train adds MindSpore's flags)
        assert set(vars(model)) - before <= {"_func_graph_flags"}
        assert model._lightms_log_target is None and model._lightms_hook is None and not model._lightms_in_step
        assert model.trainer is trainer  # as in Lightning, the module keeps its trainer


def test_the_plan_is_printable():
    x, y = make_data(16)
    trainer = quiet_trainer(max_epochs=1, accumulate=2, gradient_clip_val=0.5, sink_size=2)
    trainer.fit(fresh_model(), batches_of(x, y, 4))
    text = str(trainer._engine.plan)
    assert "2 micro-batch(es) per optimizer step, 2 per host call, compiled" in text
    assert "clip by norm 0.5 -> optimizer update" in text and "loss (mean, step)" in text
    assert lightms.__version__
