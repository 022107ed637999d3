"""Entremise: a consent-aware clearinghouse that releases only differentially private aggregates."""

__version__ = "0.1.0"
