"""Train a small GAN on a ring of 8 Gaussians with lightms' manual optimization.

Run:  python examples/gan.py
Then: tensorboard --logdir lightning_logs

The data is synthetic: 2-D points from 8 Gaussians (std 0.05) evenly spaced on a circle
of radius 2. A generator MLP maps noise to points; a discriminator MLP scores points with
a logit. Each training_step steps two Adam optimizers: the discriminator's, then the
generator's against the updated discriminator. Both losses (`loss_d`, `loss_g`) go to
TensorBoard. Each batch carries its real points and the generator's noise, both drawn on
the host from a seeded numpy generator, so a run is reproducible.

To keep the generator from collapsing onto a few modes, the discriminator judges pairs
of points (PacGAN, Lin et al. 2018): a generator that puts every sample on one mode makes
pairs that are easy to tell apart from real ones.

At the end it samples 2000 points and prints the fraction within 3 standard deviations
of a mode, and how many of the 8 modes hold at least 2% of the samples.
"""

import argparse
import time

import numpy as np

import lightms
from mindspore import Tensor, nn, ops

MODES, RADIUS, STD = 8, 2.0, 0.05
ANGLES = 2 * np.pi * np.arange(MODES) / MODES
CENTERS = (RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)).astype(np.float32)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.SequentialCell:
    return nn.SequentialCell(nn.Dense(inputs, hidden), nn.ReLU(),
                             nn.Dense(hidden, hidden), nn.ReLU(),
                             nn.Dense(hidden, outputs))


class RingGAN(lightms.LightningCell):
    """Generator: noise -> hidden -> hidden -> 2-D point. Discriminator: `pack` points -> hidden -> hidden -> logit."""

    def __init__(self, noise_dim: int = 8, hidden: int = 128, lr: float = 2e-3, total_steps: int = 4000,
                 pack: int = 2):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # training_step steps both optimizers itself
        self.pack = pack
        self.generator = mlp(noise_dim, hidden, 2)
        self.discriminator = mlp(2 * pack, hidden, 1)

    def construct(self, z):
        return self.generator(z)

    def judge(self, points):
        """The discriminator's logits for groups of `pack` points (a batch of n points gives n / pack logits)."""
        return self.discriminator(points.reshape(-1, 2 * self.pack))

    def bce(self, logits, label: float):
        """Binary cross-entropy of `logits` against one label for all (1: real, 0: fake)."""
        return ops.binary_cross_entropy_with_logits(logits, ops.full_like(logits, label))

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_d, opt_g = self.optimizers()

        # value_and_grad differentiates with respect to one optimizer's parameters only:
        # the discriminator's step leaves the generator as it is, and the other way round.
        def discriminator_loss(real, z):
            return self.bce(self.judge(real), 1.0) + self.bce(self.judge(self.generator(z)), 0.0)

        def generator_loss(z):
            # The non-saturating loss: make the discriminator call the fakes real.
            return self.bce(self.judge(self.generator(z)), 1.0)

        loss_d, grads = self.value_and_grad(discriminator_loss, opt_d)(real, z)
        self.optimizer_step(opt_d, grads)
        loss_g, grads = self.value_and_grad(generator_loss, opt_g)(z)  # against the updated discriminator
        self.optimizer_step(opt_g, self.clip_gradients(grads, gradient_clip_val=5.0, gradient_clip_algorithm="norm"))

        self.log("loss_d", loss_d, prog_bar=True)
        self.log("loss_g", loss_g, prog_bar=True)
        return loss_d + loss_g  # what on_train_batch_end sees as outputs["loss"] (returning None is fine too)

    def configure_optimizers(self):
        def adam(cell):
            # beta1 = 0.5, as usual for GANs; the learning rate decays (in-graph, at the
            # optimizer's own step count) so that the points settle onto the modes at the end.
            lr = self.hparams.lr
            schedule = nn.CosineDecayLR(min_lr=lr / 20, max_lr=lr, decay_steps=self.hparams.total_steps)
            return nn.Adam(cell.trainable_params(), learning_rate=schedule, beta1=0.5)

        return [adam(self.discriminator), adam(self.generator)]


def ring_batches(count: int, batch_size: int, noise_dim: int, rng: np.random.Generator):
    """`count` batches of (real points, generator noise), `batch_size` rows each."""
    batches = []
    for _ in range(count):
        real = CENTERS[rng.integers(0, MODES, batch_size)] + STD * rng.standard_normal((batch_size, 2))
        z = rng.standard_normal((batch_size, noise_dim))
        batches.append((real.astype(np.float32), z.astype(np.float32)))
    return batches


def evaluate(points: np.ndarray):
    """(fraction of `points` within 3 std of a mode, number of modes with at least 2% of `points` that close)."""
    distances = np.linalg.norm(points[:, None, :] - CENTERS[None, :, :], axis=-1)
    close = distances.min(axis=1) < 3 * STD
    per_mode = np.bincount(distances.argmin(axis=1)[close], minlength=MODES) / len(points)
    return float(close.mean()), int((per_mode >= 0.02).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="batches per epoch (one training_step each)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sink-size", type=int, default=10, help="training steps per host call")
    parser.add_argument("--root", default=".", help="folder for lightning_logs/")
    parser.add_argument("--quick", action="store_true", help="half the epochs (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = max(1, args.epochs // 2)

    start = time.time()
    lightms.seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    model = RingGAN(total_steps=args.steps * args.epochs)
    batches = ring_batches(args.steps, args.batch_size, model.hparams.noise_dim, rng)
    # sink_size=10: ten training steps per host call, looped inside one compiled graph.
    trainer = lightms.Trainer(max_epochs=args.epochs, default_root_dir=args.root, seed=args.seed,
                              sink_size=args.sink_size, log_every_n_steps=20, enable_checkpointing=False)
    trainer.fit(model, batches)

    z = rng.standard_normal((2000, model.hparams.noise_dim)).astype(np.float32)
    fraction, covered = evaluate(model(Tensor(z)).asnumpy())
    print(f"fraction of generated points within 3 std of a mode: {fraction:.2f}; modes covered: {covered} of {MODES} "
          f"({trainer.global_step} steps in {time.time() - start:.0f}s; logs: {trainer.log_dir})")
    return fraction, covered


if __name__ == "__main__":
    main()
