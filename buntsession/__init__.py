"""buntsession: server-side sessions for Starlette and FastAPI on an embedded append-only-file engine."""

from buntsession.engine import DB, Stats, SyncPolicy
from buntsession.errors import CorruptFileError, Error, FileLockedError, SessionTypeError, StoreError
from buntsession.middleware import SessionMiddleware
from buntsession.session import Session, Status
from buntsession.stores import BuntStore, MemoryStore, SessionStore, Store
from buntsession.users import SessionInfo

__all__ = [
    "DB",
    "BuntStore",
    "CorruptFileError",
    "Error",
    "FileLockedError",
    "MemoryStore",
    "Session",
    "SessionInfo",
    "SessionMiddleware",
    "SessionStore",
    "SessionTypeError",
    "Stats",
    "Status",
    "Store",
    "StoreError",
    "SyncPolicy",
]
__version__ = "0.1.0"
