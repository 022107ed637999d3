"""Storage adapters behind the domain's Store port."""

from entremise.server.store.memory import MemoryStore
from entremise.server.store.sql import SqlStore

__all__ = ["MemoryStore", "SqlStore"]
