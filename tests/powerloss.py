"""A file layer that remembers what an fsync made durable, and builds what a power cut could leave.

It wraps the real file system (the engine works on real files as usual) and, after every operation that
changes a file or the directory, notes the state: each file's bytes as last fsynced, its current bytes,
and the directory's names as last fsynced and as they are now. `image()` then builds, for one such
moment, a file set a machine crash could have left: the durable bytes, plus a random prefix of what was
written after them, plus optional garbage; and the directory as last fsynced or (if the kernel flushed
it anyway) as it was.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from buntsession.engine.log import FileOps


@dataclass(frozen=True)
class Moment:
    label: str
    acked: int
    """Operations acknowledged before this moment."""
    synced_acked: int
    """Operations acknowledged before the last fsync that had completed by this moment began."""
    durable_dir: dict[str, int]
    current_dir: dict[str, int]
    durable: dict[int, bytes]
    current: dict[int, bytes]


class PowerLossOps(FileOps):
    def __init__(self, directory: str, acked: Callable[[], int]) -> None:
        self.directory = directory
        self.acked = acked
        self.durable: dict[int, bytes] = {}
        self.durable_dir: dict[str, int] = {}
        self.known: dict[int, bytes] = {}  # the last bytes seen of every file, open or not
        self.fds: dict[int, int] = {}  # fd -> inode
        self.synced_acked = 0
        self.moments: list[Moment] = []

    # -- what changes state --------------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self.fds[fd] = os.fstat(fd).st_ino
        self.note(f"open {os.path.basename(path)}")
        return fd

    def close(self, fd: int) -> None:
        self._read(fd)
        self.fds.pop(fd, None)
        super().close(fd)

    def write(self, fd: int, data: bytes) -> int:  # type: ignore[override]
        n = os.write(fd, data)
        self.note("write")
        return n

    def ftruncate(self, fd: int, size: int) -> None:
        super().ftruncate(fd, size)
        self.note("truncate")

    def fsync(self, fd: int) -> None:
        acked_before = self.acked()
        super().fsync(fd)
        self.durable[self.fds[fd]] = self._read(fd)
        self.synced_acked = max(self.synced_acked, acked_before)
        self.note("fsync")

    def replace(self, src: str, dst: str) -> None:
        super().replace(src, dst)
        self.note("rename")

    def unlink(self, path: str) -> None:
        super().unlink(path)
        self.note("unlink")

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.durable_dir = self._listing()
        self.note("dirsync")

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _read(self, fd: int) -> bytes:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        self.known[self.fds[fd]] = data
        return data

    def _listing(self) -> dict[str, int]:
        return {name: os.stat(os.path.join(self.directory, name)).st_ino for name in os.listdir(self.directory)}

    def note(self, label: str) -> None:
        for fd in list(self.fds):
            self._read(fd)
        self.moments.append(Moment(label, self.acked(), self.synced_acked, dict(self.durable_dir),
                                   self._listing(), dict(self.durable), dict(self.known)))


def image(moment: Moment, rng: random.Random, target: str, *, flushed_dir: bool, garbage: bool) -> None:
    """Write into `target` the files a power cut at `moment` could have left."""
    names = moment.current_dir if flushed_dir else moment.durable_dir
    for name, inode in names.items():
        durable = moment.durable.get(inode, b"")
        current = moment.current.get(inode, durable)
        if current.startswith(durable):
            unsynced = current[len(durable):]
            data = durable + unsynced[: rng.randint(0, len(unsynced))]
        else:  # cut back since its last fsync: either length may have reached the disk
            data = rng.choice([durable, current])
        if garbage and rng.random() < 0.5:
            data += rng.choice([bytes(rng.randint(1, 600)), rng.randbytes(rng.randint(1, 600))])
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
