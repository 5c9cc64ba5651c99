"""The DP-SGD privacy accountant: its epsilons against dp_accounting, a published figure, and its errors."""

import math
import sys

import numpy as np
import pytest

dpa = pytest.importorskip("dp_accounting")

from lightms.privacy.accounting import PrivacyAccountant, compute_epsilon  # noqa: E402

MNIST_Q = 256 / 60000


def by_hand(noise_multiplier, sampling_rate, steps, delta, accountant):
    """The epsilon of `steps` Poisson-subsampled Gaussian steps, composed with dp_accounting directly."""
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    step = dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier))
    acc.compose(dpa.SelfComposedDpEvent(step, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("noise_multiplier, sampling_rate, steps, delta", [
    (1.1, MNIST_Q, 14063, 1e-5),
    (1.1, MNIST_Q, 1, 1e-5),
    (0.8, 0.01, 500, 1e-6),
    (2.0, 1.0, 10, 1e-3),
])
def test_rdp_equals_dp_accounting_composed_by_hand(noise_multiplier, sampling_rate, steps, delta):
    expected = by_hand(noise_multiplier, sampling_rate, steps, delta, "rdp")
    assert compute_epsilon(noise_multiplier, sampling_rate, steps, delta) == pytest.approx(expected, rel=1e-12)


def test_pld_equals_dp_accounting_composed_by_hand():
    expected = by_hand(1.1, MNIST_Q, 14063, 1e-5, "pld")
    assert compute_epsilon(1.1, MNIST_Q, 14063, 1e-5, accountant="pld") == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.3818, abs=1e-3)


def test_mnist_figures():
    # 60 epochs of DP-SGD on MNIST, batches of 256, delta 1e-5, with dp_accounting's
    # RDP-to-epsilon conversion (Canonne et al. 2020, Prop. 12) and with PLD.
    assert compute_epsilon(1.1, MNIST_Q, 14063, 1e-5) == pytest.approx(2.5967, abs=1e-3)
    assert compute_epsilon(1.12, MNIST_Q, 60 * 234, 1e-5) == pytest.approx(2.5165, abs=1e-3)


@pytest.mark.parametrize("noise_multiplier, steps, published", [
    # tensorflow/privacy tutorials/README.md: "Test accuracy after 60 epochs is: 0.966 /
    # For delta=1e-5, the current epsilon is: 2.92" with the tutorial's defaults then
    # (noise_multiplier 1.12, batch 256, steps = epochs * (60000 // 256)); also 1.00 after 1 epoch.
    (1.12, 60 * 234, 2.92),
    (1.12, 1 * 234, 1.00),
    # A later version of the same README: noise_multiplier 1.1, 60 epochs, eps = 3.01
    # (compute_dp_sgd_privacy.py --N=60000 --batch_size=256 --noise_multiplier=1.1 --epochs=60 --delta=1e-5).
    (1.1, 14063, 3.01),
])
def test_published_tensorflow_privacy_figures(noise_multiplier, steps, published):
    # TF Privacy converted RDP to epsilon with the classic bound min_a(rdp_a - log(delta) / (a - 1))
    # over its orders 1.1..10.9 and 12..63; the bound is recomputed here from the RDP curve.
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    acc = dpa.rdp.RdpAccountant(orders)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(MNIST_Q, dpa.GaussianDpEvent(noise_multiplier)),
                                        steps))
    classic = np.min(acc.rdp - math.log(1e-5) / (acc.orders - 1))
    assert round(float(classic), 2) == published
    # dp_accounting's conversion is tighter than the classic one at every order.
    assert 0 < compute_epsilon(noise_multiplier, MNIST_Q, steps, 1e-5) < published


def test_monotone():
    eps = [compute_epsilon(1.0, 0.01, steps, 1e-5) for steps in (1, 10, 100, 1000, 10000)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    eps = [compute_epsilon(sigma, 0.01, 1000, 1e-5) for sigma in (0.5, 0.8, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == len(eps)
    eps = [compute_epsilon(1.0, q, 1000, 1e-5) for q in (0.001, 0.01, 0.1, 1.0)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    eps = [compute_epsilon(1.0, 0.01, 1000, delta) for delta in (1e-8, 1e-5, 1e-2)]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == len(eps)


def test_pld_is_tighter_than_rdp():
    assert compute_epsilon(1.1, MNIST_Q, 14063, 1e-5, "pld") < compute_epsilon(1.1, MNIST_Q, 14063, 1e-5, "rdp")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_edge_values(accountant):
    assert compute_epsilon(1.0, 0.01, 0, 1e-5, accountant) == 0.0
    assert compute_epsilon(0.0, 0.01, 0, 1e-5, accountant) == 0.0
    assert compute_epsilon(0.0, 0.01, 1, 1e-5, accountant) == math.inf
    assert compute_epsilon(1.0, 0.01, np.int64(3), 1e-5, accountant) == compute_epsilon(1.0, 0.01, 3, 1e-5, accountant)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier"),
    (dict(sampling_rate=0.0), "sampling_rate"),
    (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(sampling_rate=float("nan")), "sampling_rate"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(accountant="prv"), "accountant"),
])
def test_invalid_arguments(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_epsilon(**args)
    if "steps" not in kwargs:
        del args["steps"]
        with pytest.raises(ValueError, match=message):
            PrivacyAccountant(**args)


def test_accountant_counts_steps_and_saves_them():
    accountant = PrivacyAccountant(1.1, MNIST_Q, 1e-5)
    assert accountant.steps == 0 and accountant.epsilon == 0.0
    accountant.step()
    accountant.step(9)
    assert accountant.steps == 10
    assert accountant.epsilon == compute_epsilon(1.1, MNIST_Q, 10, 1e-5)
    assert accountant.get_epsilon(14063) == pytest.approx(2.5967, abs=1e-3)
    with pytest.raises(ValueError, match="steps"):
        accountant.step(-1)
    assert accountant.steps == 10

    restored = PrivacyAccountant(1.1, MNIST_Q, 1e-5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.steps == 10 and restored.epsilon == accountant.epsilon


def test_missing_dp_accounting_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # makes `import dp_accounting` fail
    with pytest.raises(ImportError, match=r'pip install "lightms\[privacy\]"'):
        PrivacyAccountant(1.0, 0.01, 1e-5)
    with pytest.raises(ImportError, match=r'pip install "lightms\[privacy\]"'):
        compute_epsilon(0.777, 0.0123, 5, 1e-5)  # arguments no earlier test cached
