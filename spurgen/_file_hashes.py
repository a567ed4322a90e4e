"""SHA-256 of many files at once, remembered between commands by file identity.

Every cache in a workspace is keyed by file content, so commands hash what they read. Three costs showed in the
GPU benchmarks: thousands of images hashed one after another before the first batch is decoded, the same 800 MB
of images hashed again by every ``select-refs`` and ``evaluate`` (0.74 s a command), and a Stable Diffusion
folder (2-4 GB) hashed again by every ``generate`` for its manifest (13 s on a 2-core machine, 4 s on a GPU host,
against 3 s of sampling).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .images import file_sha256
from .workspace import atomic_write_json

__all__ = ["FileHashes", "sha256_all", "RACY_WINDOW_NS"]

# A digest is remembered only for a file last written this long before it was hashed. Within one timestamp tick
# a file can be rewritten with the same size and keep its inode and times (2 s on FAT, 1 s on HFS+ and ext3, a
# few ms on ext4 and XFS, whose kernel clock is coarse): a digest taken in that tick could describe the old bytes
# while the identity matches the new ones. Git calls such index entries "racily clean" and re-reads them; here a
# fresh file is simply hashed again by the next command, until it is older than the window.
RACY_WINDOW_NS = 2_000_000_000


def sha256_all(files: Sequence[Path]) -> list[str]:
    """The SHA-256 of each file, in order, hashed on several threads (hashlib releases the GIL)."""
    if len(files) < 64:
        return [file_sha256(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, files))


def _identity(stat: os.stat_result) -> str:
    # Any write to a file changes its modification and change times; together with the inode and size they
    # tell whether the bytes can have changed, the rule git's index and rsync rely on. The change time cannot
    # be set back by a program (unlike the modification time, which tar and cp -p restore).
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


class FileHashes:
    """SHA-256 digests remembered per file identity in a JSON file of the workspace's cache.

    A digest is reused only while the file's device, inode, size, modification and change times are unchanged,
    and only if the file had not been written within :data:`RACY_WINDOW_NS` before it was hashed; a damaged memo
    is ignored and rebuilt. Files are keyed by absolute path without resolving symbolic links (``resolve`` costs
    a system call per path component, 0.3 s for 4,096 images); a retargeted link has another identity.

    Args:
        memo: The JSON file, e.g. ``cache/sha256.json``.
    """

    def __init__(self, memo: Path) -> None:
        self.memo = memo
        self.entries = self._read()
        self.added: dict[str, dict[str, str]] = {}

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            entries = json.loads(self.memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        return entries if isinstance(entries, dict) else {}

    def digests(self, files: Sequence[Path]) -> list[str]:
        """Each file's SHA-256, in order; only files the memo has no digest for under their identity are hashed.

        Args:
            files: The files; unreadable ones raise ``OSError`` as :func:`file_sha256` does.
        """
        keys = [os.path.abspath(f) for f in files]
        stats = [os.stat(f) for f in files]
        found: list[str | None] = []
        for key, stat in zip(keys, stats):
            entry = self.entries.get(key)
            usable = isinstance(entry, dict) and entry.get("identity") == _identity(stat)
            found.append(entry["sha256"] if usable and isinstance(entry.get("sha256"), str) else None)
        missing = [i for i, digest in enumerate(found) if digest is None]
        # Identities were taken before hashing: a file written meanwhile has a newer one next time.
        hashed = sha256_all([files[i] for i in missing])
        now = time.time_ns()
        for i, digest in zip(missing, hashed):
            found[i] = digest
            if now - stats[i].st_mtime_ns > RACY_WINDOW_NS:
                self.added[keys[i]] = self.entries[keys[i]] = {"identity": _identity(stats[i]), "sha256": digest}
        return [digest for digest in found if digest is not None]

    def digest(self, path: Path) -> str:
        """The file's SHA-256, hashed only when the memo has none for its current identity."""
        return self.digests([path])[0]

    def save(self) -> None:
        """Adds the new digests to the memo file (atomically), keeping what other commands wrote since it was read."""
        if self.added:
            self.entries = {**self._read(), **self.added}
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.memo, self.entries)
            self.added = {}
