"""Entremise: a consent-aware clearinghouse that releases only differentially private aggregates.

In a notebook::

    import entremise

    hub = entremise.connect("127.0.0.1:50051", token=token)
    df = hub.sql("SELECT COUNT(DISTINCT person) AS people FROM bank JOIN panel", epsilon=0.5)

`connect` imports the SDK when first used, so that `import entremise.v1` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from entremise.sdk.notebook import Hub as Hub
    from entremise.sdk.notebook import connect as connect

__all__ = ["Hub", "__version__", "connect"]


def __getattr__(name: str) -> Any:
    """`entremise.connect` and `entremise.Hub`, imported from the SDK when first asked for."""
    if name in ("connect", "Hub"):
        from entremise.sdk import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'entremise' has no attribute {name!r}")
