"""buntsession: server-side sessions for Starlette and FastAPI on an embedded append-only-file engine."""

from buntsession.errors import CorruptFileError, Error, FileLockedError, SessionTypeError, StoreError

__all__ = ["CorruptFileError", "Error", "FileLockedError", "SessionTypeError", "StoreError"]
__version__ = "0.1.0.dev0"
