"""Session stores: the contract, the embedded `BuntStore` and the in-memory `MemoryStore`."""

from buntsession.stores.base import SessionStore, Store
from buntsession.stores.bunt import BuntStore
from buntsession.stores.memory import MemoryStore

__all__ = ["BuntStore", "MemoryStore", "SessionStore", "Store"]
