"""The embedded append-only-file key/value engine."""

from buntsession.engine.db import DB, Stats, SyncPolicy

__all__ = ["DB", "Stats", "SyncPolicy"]
