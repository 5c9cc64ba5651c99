"""Differentially private training: the `DPSGD` plugin and its privacy accounting (`dp-accounting`)."""

from lightms.privacy.accounting import PrivacyAccountant, compute_epsilon
from lightms.privacy.dpsgd import DPSGD

__all__ = ["DPSGD", "PrivacyAccountant", "compute_epsilon"]
