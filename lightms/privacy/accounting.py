"""Privacy accounting for DP-SGD: the epsilon spent after a number of steps.

One DP-SGD optimizer step is a Poisson-subsampled Gaussian mechanism: each
example joins the batch with probability `sampling_rate`, per-example gradients
are clipped to norm C and Gaussian noise of standard deviation
`noise_multiplier * C` is added to their sum. The epsilon of `steps` such steps
at a given delta comes from Google's `dp_accounting` library, with either
accountant:

- "rdp": Renyi DP (the bound TensorFlow Privacy and Opacus report by default).
  The RDP of one step is computed once per (noise_multiplier, sampling_rate);
  `steps` steps cost about 0.3 ms more, since RDP composes linearly.
- "pld": privacy loss distributions, a tighter epsilon, but each new steps
  count takes about 0.5 s. Query it at epoch ends, not every step.

`dp_accounting` is imported only when needed: `pip install "lightms[privacy]"`.
"""

import functools
import math
import numbers

ACCOUNTANTS = ("rdp", "pld")

_INSTALL_HINT = 'privacy accounting needs dp-accounting: pip install "lightms[privacy]"'


def _import_dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return dp_accounting


def _check_mechanism(noise_multiplier, sampling_rate, delta, accountant):
    noise_multiplier = float(noise_multiplier)
    sampling_rate = float(sampling_rate)
    delta = float(delta)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return noise_multiplier, sampling_rate, delta


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    return int(steps)


@functools.lru_cache(maxsize=32)
def _one_step_rdp(noise_multiplier, sampling_rate):
    """Returns (orders, RDP of one step at each order); about 30 ms to compute."""
    dpa = _import_dp_accounting()
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)))
    return accountant.orders, accountant.rdp


@functools.lru_cache(maxsize=1024)
def _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant):
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dpa = _import_dp_accounting()
    if accountant == "rdp":
        # RDP adds up over steps: this equals composing the step `steps` times.
        orders, rdp = _one_step_rdp(noise_multiplier, sampling_rate)
        return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, steps * rdp, delta)[0])
    pld = dpa.pld.PLDAccountant()
    step = dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier))
    pld.compose(dpa.SelfComposedDpEvent(step, steps))
    return float(pld.get_epsilon(delta))


def compute_epsilon(noise_multiplier, sampling_rate, steps, delta, accountant="rdp"):
    """Returns the epsilon spent by `steps` steps of DP-SGD.

    Results are cached per (arguments, steps).

    Args:
        noise_multiplier: Standard deviation of the Gaussian noise divided by the
            clipping norm; >= 0.
        sampling_rate: Probability that an example is in a step's batch
            (batch size / dataset size); in (0, 1].
        steps: Number of optimizer steps taken; an int >= 0.
        delta: Target delta; in (0, 1).
        accountant: "rdp" (Renyi DP) or "pld" (privacy loss distributions).

    Returns:
        The epsilon as a float: 0.0 for 0 steps, inf for a noise multiplier of 0.

    Raises:
        ValueError: If an argument is out of range or `accountant` is unknown.
        ImportError: If `dp_accounting` is not installed.
    """
    mechanism = _check_mechanism(noise_multiplier, sampling_rate, delta, accountant)
    steps = _check_steps(steps)
    noise_multiplier, sampling_rate, delta = mechanism
    return _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant)


class PrivacyAccountant:
    """Counts DP-SGD steps and reports the epsilon they spent.

    Example:
        accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=256 / 60000, delta=1e-5)
        accountant.step()       # after each optimizer step
        accountant.epsilon      # epsilon spent so far

    Args:
        noise_multiplier: Standard deviation of the Gaussian noise divided by the
            clipping norm; >= 0.
        sampling_rate: Probability that an example is in a step's batch; in (0, 1].
        delta: Target delta; in (0, 1).
        accountant: "rdp" or "pld" (see `compute_epsilon`).

    Raises:
        ValueError: If an argument is out of range or `accountant` is unknown.
        ImportError: If `dp_accounting` is not installed.
    """

    def __init__(self, noise_multiplier, sampling_rate, delta, accountant="rdp"):
        mechanism = _check_mechanism(noise_multiplier, sampling_rate, delta, accountant)
        _import_dp_accounting()  # a missing package fails here, before training starts
        self.noise_multiplier, self.sampling_rate, self.delta = mechanism
        self.accountant = accountant
        self.steps = 0

    def step(self, num_steps=1):
        """Records `num_steps` more optimizer steps.

        Args:
            num_steps: Steps taken; an int >= 0.

        Raises:
            ValueError: If `num_steps` is not an int >= 0.
        """
        self.steps += _check_steps(num_steps)

    def get_epsilon(self, steps=None):
        """Returns the epsilon spent after `steps` steps.

        Args:
            steps: Number of steps; None for the steps recorded so far.

        Returns:
            The epsilon as a float (see `compute_epsilon`).

        Raises:
            ValueError: If `steps` is not an int >= 0.
        """
        steps = self.steps if steps is None else steps
        return compute_epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta, self.accountant)

    @property
    def epsilon(self):
        """The epsilon spent by the steps recorded so far."""
        return self.get_epsilon()

    def state_dict(self):
        """Returns the state to checkpoint: `{"steps": int}`."""
        return {"steps": self.steps}

    def load_state_dict(self, state):
        """Restores the step count saved by `state_dict`.

        Args:
            state: A dict from `state_dict`.

        Raises:
            ValueError: If `state["steps"]` is not an int >= 0.
        """
        self.steps = _check_steps(state["steps"])
