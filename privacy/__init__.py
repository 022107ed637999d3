"""Differential privacy for Entremise: exact budgets, sensitivities and OpenDP mechanisms.

This package is the only place that imports OpenDP.
"""

from entremise.privacy.budget import Delta, Epsilon, Measure, MixedMeasuresError, PrivacyLoss, Rho
from entremise.privacy.mechanisms import IntegerLaplace

__all__ = [
    "Delta",
    "Epsilon",
    "IntegerLaplace",
    "Measure",
    "MixedMeasuresError",
    "PrivacyLoss",
    "Rho",
]
