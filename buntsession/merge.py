"""What one request writes into a stored session, and how a store applies it: the merge rule, in one place.

A commit hands the store an `Update`. In the common case nobody wrote the session since the request loaded
it, and the store writes `update.record()`, the session as the request leaves it, with no decoding at all.
When another request wrote it meanwhile, only this request's own changes go onto what is stored, key by
key (`update.changed()`, `removed`, `cleared`), so overlapping requests keep each other's keys. A session
that is gone is never brought back: only a new session (`create`) is written where nothing is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from typing import Any

from buntsession.codec import Meta, decode_record, encode_record, reusable_head

__all__ = ["Update", "apply_update"]

logger = logging.getLogger("buntsession")


class Update:
    """One request's changes to a session, for a store to apply atomically onto what it holds."""

    __slots__ = ("_record", "base", "cleared", "create", "data", "expires_at", "meta", "meta_changed", "put",
                 "removed")

    def __init__(
        self,
        data: dict[str, Any],
        meta: Meta,
        expires_at: float,
        *,
        create: bool = False,
        base: bytes | None = None,
        put: Set[str] = frozenset(),
        removed: Set[str] = frozenset(),
        cleared: bool = False,
        meta_changed: bool = False,
    ) -> None:
        self.data = data
        """Every key of the session as the request leaves it (decoded values)."""
        self.meta = meta
        """The session's metadata as the request leaves it."""
        self.expires_at = expires_at
        """When the store may forget the session (unix time): the earlier of its end and its idle deadline."""
        self.create = create
        """True for a new session (written whatever is stored); False applies only onto a session that
        still exists, so a destroyed or renewed session is never brought back."""
        self.base = base
        """The record as the request loaded it (None for a new session)."""
        self.put = put
        """Keys the request assigned or changed in place."""
        self.removed = removed
        self.cleared = cleared
        """Drop every stored key before applying the request's own."""
        self.meta_changed = meta_changed
        """Whether `meta` differs from what was loaded (remember-me changed)."""
        self._record: bytes | None = None

    def record(self) -> bytes:
        """The whole session as the request leaves it, encoded once. TypeError or ValueError for a value
        that cannot be kept (only a list or dict changed in place can hold one)."""
        if self._record is None:
            head = reusable_head(self.base) if self.base is not None and not self.meta_changed else None
            self._record = encode_record(self.meta, self.data, head)
        return self._record

    def planned(self, stored: bytes | None) -> tuple[bytes, float] | None:
        """`apply_update` in the form of `DB.update`'s change: the record to store with its expiry, or None."""
        merged = apply_update(stored, self)
        return None if merged is None else (merged, self.expires_at)

    def changed(self) -> dict[str, Any]:
        """The keys this request set or changed in place, with their values; for a new session, all."""
        data = self.data
        if self.create or self.base is None:
            return dict(data)
        return {key: data[key] for key in self.put if key in data}


def apply_update(stored: bytes | None, update: Update) -> bytes | None:
    """The record to store after `update`, or None when nothing may be written (the session is gone).

    A stored record that cannot be read (tampered with?) is logged and left alone: None.
    """
    if update.create:
        return update.record()
    if stored is None:
        return None
    if stored is update.base or stored == update.base:
        return update.record()  # nobody wrote it meanwhile: the request's view is the whole truth
    try:
        meta, values = decode_record(stored)
    except ValueError:
        logger.warning("a stored session could not be decoded (tampered with?); a request's changes were dropped")
        return None
    if update.cleared:
        values = {}
    values.update(update.changed())
    for key in update.removed:
        if key not in update.put:
            values.pop(key, None)
    return encode_record(update.meta if update.meta_changed else meta, values)
