"""Storage adapters behind the domain's Store port."""

from entremise.server.store.sql import SqlStore

__all__ = ["SqlStore"]
