"""configure_optimizers: accepted forms and errors."""

import pytest
from mindspore import nn

from lightms.trainer.optimizers import read_optimizer_config
from conftest import TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer


def _fit(cls):
    x, y = make_data(8)
    quiet_trainer(max_epochs=1).fit(fresh_model(cls=cls), batches_of(x, y, 4))


def test_missing_configure_optimizers():
    class NoOptimizer(TinyRegressor):
        configure_optimizers = __import__("lightms").LightningCell.configure_optimizers

    with pytest.raises(NotImplementedError, match="configure_optimizers"):
        _fit(NoOptimizer)


@pytest.mark.parametrize("returned,error,text", [
    (None, TypeError, "returned None"),
    ("adam", TypeError, "not a mindspore optimizer"),
    ({"lr": 0.1}, TypeError, "without the key 'optimizer'"),
])
def test_configure_optimizers_returning_something_else(returned, error, text):
    class Bad(TinyRegressor):
        def configure_optimizers(self):
            return returned

    with pytest.raises(error, match=text):
        _fit(Bad)


def test_accepted_forms():
    net = nn.Dense(2, 2)
    opt = nn.SGD(net.trainable_params(), 0.1)
    for form in (opt, [opt], (opt,), {"optimizer": opt}):
        assert read_optimizer_config(form, "M").optimizer is opt
    with pytest.raises(ValueError, match="same optimizer twice"):
        read_optimizer_config([opt, opt], "M", automatic=False)
    other = nn.SGD(net.trainable_params(), 0.2)
    with pytest.raises(ValueError, match="returned 2 optimizers.*automatic_optimization = False"):
        read_optimizer_config([opt, other], "M")
    # Several optimizers (manual optimization), in Lightning's forms, in their order, with their schedulers.
    from mindspore.experimental import optim

    first, second = optim.SGD(net.trainable_params(), lr=0.1), optim.SGD(net.trainable_params(), lr=0.2)
    steps = [optim.lr_scheduler.StepLR(o, 1) for o in (first, second)]
    for form in ([first, second], ([first, second], steps),
                 ({"optimizer": first, "lr_scheduler": steps[0]}, {"optimizer": second, "lr_scheduler": steps[1]})):
        config = read_optimizer_config(form, "M", automatic=False)
        assert config.optimizers == [first, second]
        assert [c.scheduler for c in config.schedulers] == (steps if isinstance(form, tuple) else [])
    with pytest.raises(TypeError, match="not a learning-rate scheduler"):
        read_optimizer_config({"optimizer": opt, "lr_scheduler": object()}, "M")


def test_experimental_optimizer_compiled_equals_eager():
    from mindspore.experimental import optim
    import numpy as np

    class AdamW(TinyRegressor):
        def configure_optimizers(self):
            return optim.AdamW(self.trainable_params(), lr=1e-2)

    x, y = make_data(64)
    results = []
    for compile in (True, False):
        model = fresh_model(cls=AdamW)
        trainer = quiet_trainer(max_epochs=2, accumulate=2, compile=compile)
        trainer.fit(model, batches_of(x, y, 8))
        results.append((model.net[0].weight.asnumpy(), trainer.global_step))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1] == results[1][1] == 8
    assert not np.allclose(results[0][0], fresh_model(cls=AdamW).net[0].weight.asnumpy())


def _lr_of(trainer):
    return float(trainer.optimizers[0].param_groups[0]["lr"].asnumpy())


def test_host_scheduler_per_step_with_frequency_counts_optimizer_steps():
    from mindspore.experimental import optim

    class Scheduled(TinyRegressor):
        def configure_optimizers(self):
            opt = optim.SGD(self.trainable_params(), lr=0.1)
            sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}

    x, y = make_data(48)
    trainer = quiet_trainer(max_epochs=1, accumulate=2)
    trainer.fit(fresh_model(cls=Scheduled), batches_of(x, y, 4))  # 12 batches -> 6 steps -> 3 scheduler steps
    assert _lr_of(trainer) == pytest.approx(0.1 * 0.5 ** 3)


def test_epoch_scheduler_and_plateau_scheduler():
    from mindspore.experimental import optim

    class Epochly(TinyRegressor):
        def configure_optimizers(self):
            opt = optim.SGD(self.trainable_params(), lr=0.1)
            return [opt], [optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)]

    x, y = make_data(16)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(fresh_model(cls=Epochly), batches_of(x, y, 8))
    assert _lr_of(trainer) == pytest.approx(0.1 * 0.1 ** 3, rel=1e-5)

    class Plateau(TinyRegressor):
        def configure_optimizers(self):
            opt = optim.SGD(self.trainable_params(), lr=0.1)
            sched = optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": sched, "monitor": "flat"}

        def on_validation_epoch_end(self):
            self.log("flat", 1.0)  # never improves after the first epoch

    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(fresh_model(cls=Plateau), batches_of(x, y, 8), batches_of(x, y, 8))
    assert _lr_of(trainer) == pytest.approx(0.1 * 0.5 ** 3)  # epochs 2, 3, 4 did not improve


def test_plateau_scheduler_needs_a_monitor():
    from mindspore.experimental import optim

    net = nn.Dense(2, 2)
    opt = optim.SGD(net.trainable_params(), lr=0.1)
    with pytest.raises(ValueError, match="needs a 'monitor'"):
        read_optimizer_config({"optimizer": opt, "lr_scheduler": optim.lr_scheduler.ReduceLROnPlateau(opt)}, "M")
    with pytest.raises(ValueError, match="interval"):
        read_optimizer_config({"optimizer": opt, "lr_scheduler": {
            "scheduler": optim.lr_scheduler.StepLR(opt, 1), "interval": "batch"}}, "M")
