"""Train an MLP on scikit-learn's bundled digits (8x8 images, 10 classes) with lightms.

Run:  python examples/digits.py
Then: tensorboard --logdir lightning_logs

The data ships inside scikit-learn (no download). Training uses gradient
accumulation (4 micro-batches of 32 per optimizer step), logs the training loss,
the validation accuracy and the learning rate to TensorBoard, and keeps the
checkpoint with the best validation accuracy.
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lightms
from lightms.callbacks import LearningRateMonitor, ModelCheckpoint
from mindspore import nn, ops
import mindspore as ms


class DigitsMLP(lightms.LightningCell):
    """A 64-128-128-10 MLP classifier."""

    def __init__(self, hidden: int = 128, lr: float = 2e-3, adam_eps: float = 1e-8):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.SequentialCell(
            nn.Dense(64, hidden), nn.ReLU(),
            nn.Dense(hidden, hidden), nn.ReLU(),
            nn.Dense(hidden, 10),
        )
        self.loss_fn = nn.CrossEntropyLoss()

    def construct(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        accuracy = (ops.argmax(logits, -1) == y).astype(ms.float32).mean()
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self):
        # An in-graph schedule: evaluated inside the compiled step at the optimizer's own step count.
        schedule = nn.CosineDecayLR(min_lr=self.hparams.lr / 20, max_lr=self.hparams.lr, decay_steps=300)
        return nn.Adam(self.trainable_params(), learning_rate=schedule, eps=self.hparams.adam_eps)


def digits_batches(batch_size: int, seed: int):
    """Returns (train, val) lists of (x, y) batches: pixels scaled to [0, 1], a 20% validation split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def split(xs, ys):
        return [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(xs), batch_size)]

    return split(x_train, y_train), split(x_val, y_val)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32-true", help='e.g. "16-mixed" (see the README\'s table)')
    parser.add_argument("--sink-size", default="1", help='micro-batches per host call: an int or "epoch"')
    parser.add_argument("--root", default=".", help="folder for lightning_logs/")
    args = parser.parse_args(argv)

    lightms.seed_everything(args.seed)
    train, val = digits_batches(batch_size=32, seed=args.seed)
    # With half-precision parameters ("16-true") Adam's state is float16 too, where 1e-8 is 0.
    model = DigitsMLP(adam_eps=1e-4 if args.precision.endswith("-true") else 1e-8)
    best = ModelCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    sink_size = args.sink_size if args.sink_size == "epoch" else int(args.sink_size)
    trainer = lightms.Trainer(max_epochs=args.epochs, accumulate=args.accumulate, default_root_dir=args.root,
                              log_every_n_steps=5, seed=args.seed, callbacks=[best, LearningRateMonitor()],
                              precision=args.precision, sink_size=sink_size)
    trainer.fit(model, train, val)
    accuracy = trainer.callback_metrics["val_acc"]
    print(f"final validation accuracy: {accuracy:.4f}  (logs: {trainer.log_dir})")
    print(f"best checkpoint: {best.best_model_path} (val_acc {best.best_model_score:.4f})")
    return accuracy


if __name__ == "__main__":
    main()
