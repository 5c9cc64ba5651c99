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
    with pytest.raises(ValueError, match="exactly one optimizer"):
        read_optimizer_config([opt, opt], "M")
    with pytest.raises(ValueError, match="scheduler"):
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
