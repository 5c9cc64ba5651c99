"""mindspore.train.Metric objects updated in validation_step / test_step and logged by name."""

import numpy as np
import pytest
from mindspore import Tensor, nn
from mindspore.train import Accuracy

import lightms
from conftest import batches_of, quiet_trainer


class Classifier(lightms.LightningCell):
    def __init__(self):
        super().__init__()
        self.net = nn.Dense(6, 3)
        self.val_acc = Accuracy()
        self.loss_fn = nn.CrossEntropyLoss()

    def construct(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", self.loss_fn(logits, y))

    def configure_optimizers(self):
        return nn.SGD(self.trainable_params(), learning_rate=0.5)


@pytest.mark.parametrize("compile", [True, False])
def test_metric_logged_at_epoch_end_matches_numpy(compile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    lightms.seed_everything(0)
    model = Classifier()
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=1, compile=compile)
    trainer.fit(model, batches_of(x, y, 16), batches_of(x, y, 16))
    logits = model.net(Tensor(x)).asnumpy()
    expected_acc = float((logits.argmax(-1) == y).mean())
    assert trainer.callback_metrics["val_acc"] == pytest.approx(expected_acc)
    shifted = logits - logits.max(-1, keepdims=True)
    losses = -(shifted[np.arange(50), y] - np.log(np.exp(shifted).sum(-1)))
    sizes = [16, 16, 16, 2]
    batch_means = [losses[i:i + 16].mean() for i in range(0, 50, 16)]
    assert trainer.callback_metrics["val_loss"] == pytest.approx(np.average(batch_means, weights=sizes), rel=1e-5)
    result = trainer.validate(model, batches_of(x, y, 16))
    assert result[0]["val_acc"] == pytest.approx(expected_acc)
    assert "construct" not in vars(model)  # the compiled forward is removed after the run
