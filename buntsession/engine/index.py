"""The in-memory index: every key's value and expiry, an expiry heap, and what a record does to them.

This module is the one home of the record rules that do not touch a file:

- what SET, DEL and EXPIRE records do, applied in file order (`apply_record`): used by open, by shared
  mode catching up with the other processes, and by the operator tools' offline scan;
- which keys are live at a moment (an expiry at or before it is dead);
- the live size (the bytes a fresh rewrite of the live set takes).

`Index` is plain data and code, with no lock and no I/O: the DB touches it only from the event loop.
"""

from __future__ import annotations

import heapq
from typing import Final

from buntsession.engine import format as fmt

__all__ = ["Entry", "Index", "apply_record", "live_size", "record_size"]

Entry = tuple[bytes, float | None]
"""What the index keeps per key: the value and its absolute expiry (unix seconds) or None."""

_EMPTY: Final[dict[str, Entry]] = {}


def apply_record(data: dict[str, Entry], rtype: int, key: str, value: bytes, expire_at: float | None) -> None:
    """Apply one record to `data`, as the write that made it was applied.

    Expiry is not judged here: a later EXPIRE may extend a SET's expiry, and an EXPIRE of a key that has no
    entry does nothing (a DB writes one only for a live key). Whoever reads `data` judges expiry.
    """
    if rtype == fmt.SET:
        data[key] = (value, expire_at)
    elif rtype == fmt.DEL:
        data.pop(key, None)
    else:
        entry = data.get(key)
        if entry is not None:
            data[key] = (entry[0], expire_at)


def record_size(key: str, value: bytes) -> int:
    """Bytes of the SET record of `key` and `value` in a file."""
    return fmt.RECORD_HEADER_SIZE + (len(key) if key.isascii() else len(key.encode())) + len(value)


def live_size(data: dict[str, Entry], now: float | None = None) -> int:
    """Bytes a freshly rewritten file takes for the entries of `data` (those live at `now`, if given)."""
    total = fmt.FILE_HEADER_SIZE
    for key, (value, exp) in data.items():
        if now is None or exp is None or exp > now:
            total += record_size(key, value)
    return total


class Index:
    """Keys with their entries, and a min-heap of expiries that finds the keys that are due.

    Each key with an expiry has a heap entry at or before its expiry. Extending an expiry pushes nothing:
    when the old heap entry comes due, `drop_expired` pushes the key again at its new time.
    """

    __slots__ = ("data", "heap")

    def __init__(self, data: dict[str, Entry] | None = None, now: float | None = None) -> None:
        """An index of `data` (taken over, not copied) without the entries that expired at `now`."""
        if data is None:
            data = {}
        elif now is not None:
            data = {key: entry for key, entry in data.items() if entry[1] is None or entry[1] > now}
        self.data: dict[str, Entry] = data
        heap = [(exp, key) for key, (_, exp) in data.items() if exp is not None]
        heapq.heapify(heap)
        self.heap: list[tuple[float, str]] = heap

    def put(self, key: str, entry: Entry) -> None:
        """Install `entry` for `key`."""
        data = self.data
        old = data.get(key)
        data[key] = entry
        exp = entry[1]
        if exp is not None and (old is None or old[1] is None or exp < old[1]):
            heapq.heappush(self.heap, (exp, key))

    def apply(self, rtype: int, key: str, value: bytes, expire_at: float | None) -> None:
        """`apply_record` on a live index, keeping the heap right (shared mode's catch-up)."""
        if rtype == fmt.SET:
            self.put(key, (value, expire_at))
        elif rtype == fmt.DEL:
            self.data.pop(key, None)
        elif (entry := self.data.get(key)) is not None:
            self.put(key, (entry[0], expire_at))

    def live(self, key: str, now: float) -> Entry | None:
        """The entry of `key` if it is live at `now`; an expired one is dropped."""
        entry = self.data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            self.data.pop(key, None)  # a reader in another thread may have dropped it meanwhile
            return None
        return entry

    def expired_count(self, now: float) -> int:
        """Keys in memory whose expiry has passed. Visits only the heap entries that are due."""
        heap, data = self.heap, self.data
        found: set[str] = set()
        stack = [0] if heap else []
        size = len(heap)
        while stack:
            i = stack.pop()
            at, key = heap[i]
            if at > now:
                continue
            entry = data.get(key)
            if entry is not None and entry[1] is not None and entry[1] <= now:
                found.add(key)
            stack.extend(c for c in (2 * i + 1, 2 * i + 2) if c < size)
        return len(found)

    def drop_expired(self, now: float, limit: int) -> tuple[int, bool]:
        """Drop up to `limit` due heap entries' expired keys. Returns (keys dropped, whether more are due)."""
        heap, data = self.heap, self.data
        dropped = n = 0
        pop, push = heapq.heappop, heapq.heappush
        while heap and heap[0][0] <= now and n < limit:
            _, key = pop(heap)
            n += 1
            entry = data.get(key)
            if entry is None or entry[1] is None:
                continue  # deleted or made persistent since
            if entry[1] <= now:
                del data[key]
                dropped += 1
            else:
                push(heap, (entry[1], key))  # extended since: come back then
        return dropped, bool(heap) and heap[0][0] <= now

    def clear(self) -> None:
        self.data = {}
        self.heap = []
