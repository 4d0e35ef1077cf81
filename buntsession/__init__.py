"""buntsession: server-side sessions for Starlette and FastAPI on an embedded append-only-file engine."""

from buntsession.engine import DB, Stats, SyncPolicy
from buntsession.errors import CorruptFileError, Error, FileLockedError, SessionTypeError, StoreError

__all__ = [
    "DB",
    "CorruptFileError",
    "Error",
    "FileLockedError",
    "SessionTypeError",
    "Stats",
    "StoreError",
    "SyncPolicy",
]
__version__ = "0.1.0.dev0"
