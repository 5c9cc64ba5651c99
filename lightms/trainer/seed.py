"""`seed_everything`: one seed for MindSpore, its datasets, numpy and Python."""

import random

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import dataset as msds


def seed_everything(seed: int) -> int:
    """Seeds MindSpore's global generator, `mindspore.dataset`, numpy and `random`.

    Call it before building the model to make its initial weights reproducible.

    Args:
        seed: A non-negative int.

    Returns:
        The seed.

    Raises:
        TypeError: If `seed` is not an int >= 0.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be an int >= 0, got {seed!r}.")
    ms.set_seed(seed)
    msds.config.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed
