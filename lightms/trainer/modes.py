"""What manual optimization, DP-SGD and data parallelism need from a run: checked and set up once per fit.

The loop (`loop.py`) calls these at fixed points: the checks when fit starts, the
per-example check at the first batch, and, with several workers, the start of data
parallelism and the stop agreement at every chunk and epoch end.
"""

import signal

from mindspore import Tensor, ops


def start_data_parallel(trainer, train) -> None:
    """Several workers: the same weights everywhere (rank 0's), the same shuffles (rank 0's dataset seed),
    each worker its share of the data and the same number of batches (the fewest any worker has); a resumed
    epoch's logged sums stay on rank 0, which saved them.

    Raises:
        ValueError: For data a worker cannot take its share of (`DataSource.shard`).
    """
    import random

    import mindspore.dataset as msds

    from lightms.distributed.environment import broadcast_parameters
    from lightms.distributed.reduction import agree_on_minimum, agree_on_seed

    broadcast_parameters(trainer.model.get_parameters())
    if isinstance(train.data, msds.Dataset):  # every worker must cut the same shuffled order
        seed = trainer.seed if trainer.seed is not None else msds.config.get_seed()
        if seed == _UNSET_DATASET_SEED:  # MindSpore's default: each process would shuffle its own way
            seed = random.randrange(2 ** 31)
        msds.config.set_seed(agree_on_seed(seed))
    train.shard(trainer.global_rank, trainer.world_size)
    length = train.length()
    fewest = agree_on_minimum(length)
    if fewest < length:
        train.limit_to(fewest)
    if not trainer.is_global_zero and trainer._pending_engine_state is not None:
        # The names stay (every worker must build the same buffers: their epoch ends reduce together); the sums
        # so far are rank 0's alone, so the other workers start theirs from nothing.
        tensors, rest = trainer._pending_engine_state
        if "logs" in rest:
            from lightms.module.device_logs import empty_level
            from lightms.module.logging import LogOptions

            options = rest["logs"]["options"]
            empty = empty_level([LogOptions(**o) for o in options]).tolist()
            rest = {**rest, "logs": {"options": options, "epoch": empty}}
        trainer._pending_engine_state = (tensors, rest)


# `mindspore.dataset.config.get_seed()` when nobody set one (std::mt19937's default seed).
_UNSET_DATASET_SEED = 5489


def check_manual_optimization(trainer) -> None:
    """Refuses the Trainer options that automatic optimization implements, naming what to use instead.

    Raises:
        ValueError: For accumulate > 1, gradient_clip_val, or a precision with loss scaling.
    """
    name = type(trainer.model).__name__
    if trainer.accumulate > 1:
        raise ValueError(f"Trainer(accumulate={trainer.accumulate}) accumulates gradients for automatic optimization, "
                         f"but {name} uses manual optimization (automatic_optimization = False): add the "
                         "gradients of several batches yourself (keep them in Parameters) and call "
                         "self.optimizer_step every n batches.")
    if trainer.gradient_clip_val is not None:
        raise ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips for automatic optimization, "
                         f"but {name} uses manual optimization: clip in training_step with "
                         "grads = self.clip_gradients(grads, gradient_clip_val=..., gradient_clip_algorithm=...).")
    if trainer.precision.loss_scaling:
        raise ValueError(f"Trainer(precision={trainer.precision.name!r}) scales the loss for automatic optimization, "
                         f"which {name} (manual optimization) does not use; use precision='32' or a precision "
                         "without loss scaling.")


def check_privacy(trainer) -> None:
    """Refuses what DP-SGD cannot run with, before anything is trained.

    Raises:
        ValueError: For manual optimization, gradient_clip_val, loss scaling, or BatchNorm in training mode.
    """
    from lightms.privacy.dpsgd import check_splittable

    name = type(trainer.model).__name__
    if trainer.world_size > 1:
        raise ValueError("Trainer(plugins=[DPSGD(...)]) with several data-parallel workers is not supported yet: "
                         "train DP-SGD in one process.")
    if not trainer.model.automatic_optimization:
        raise ValueError(f"Trainer(plugins=[DPSGD(...)]) privatises automatic optimization's step, but {name} uses "
                         "manual optimization; compute per-example gradients with lightms.per_sample_grads "
                         "instead.")
    if trainer.gradient_clip_val is not None:
        raise ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) with DPSGD: DP-SGD clips each "
                         "example's gradient to DPSGD(max_grad_norm=...); drop gradient_clip_val.")
    if trainer.precision.loss_scaling:
        raise ValueError(f"Trainer(precision={trainer.precision.name!r}) scales the loss, which DPSGD does not "
                         "support; use precision='32'.")
    check_splittable(trainer.model)


def check_per_example_loss(trainer, batch) -> None:
    """DP-SGD, at the first batch: the accountant's sampling rate, and an eager check that training_step's loss
    splits per example."""
    from lightms.privacy.dpsgd import check_flat, check_per_example_loss, epoch_examples

    check_flat(batch.data, "train_dataloaders")
    privacy = trainer.privacy
    privacy.plan_sampling(trainer.accumulate, *epoch_examples(trainer._train_source, trainer.num_training_batches,
                                                           batch.size, privacy.dataset_size))
    twin = trainer._binding.silent_twin(trainer._counters)

    def loss_of(data) -> float:
        output = twin.training_step(data, batch.index)
        return float((output["loss"] if isinstance(output, dict) else output).asnumpy())

    buffers = [(p, p.asnumpy().copy()) for p in trainer.model.get_parameters() if not p.requires_grad]
    try:
        with trainer._binding.evaluating():  # dropout would draw other masks for the batch and for each example
            check_per_example_loss(loss_of, batch.data, f"{type(trainer.model).__name__}.training_step")
    finally:
        for param, value in buffers:
            ops.assign(param, Tensor(value))


def agree_on_stopping(trainer) -> None:
    """Data parallelism: a stop one worker wants (a signal, `should_stop`) becomes every worker's, at the same
    step, so that none waits forever in a collective for one that left (one small AllReduce)."""
    if trainer.world_size == 1:
        return
    from lightms.distributed.reduction import any_worker

    interrupted, stopping = any_worker([trainer._interrupt_signal is not None, trainer.state.should_stop])
    trainer._progressed("epoch %d, step %d", trainer.state.current_epoch, trainer.state.global_step)
    if interrupted and trainer._interrupt_signal is None:
        trainer._interrupt_signal = signal.SIGTERM
    trainer._stop_agreed = interrupted  # a signal arriving after this waits for the next agreement
    trainer.state.should_stop = stopping


__all__ = ["agree_on_stopping", "check_manual_optimization", "check_per_example_loss", "check_privacy",
           "start_data_parallel"]
