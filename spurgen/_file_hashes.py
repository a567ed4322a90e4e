"""SHA-256 of many files at once, and of large weight files remembered between commands.

Every cache in a workspace is keyed by file content, so commands hash what they read. Two costs showed in the
GPU benchmarks: thousands of images hashed one after another before the first batch is decoded, and a Stable
Diffusion folder (2-4 GB) hashed again by every ``generate`` for its manifest (13 s on a 2-core machine, 4 s on
a GPU host, against 3 s of sampling).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .images import file_sha256
from .workspace import atomic_write_json

__all__ = ["FileHashes", "sha256_all"]


def sha256_all(files: Sequence[Path]) -> list[str]:
    """The SHA-256 of each file, in order, hashed on several threads (hashlib releases the GIL)."""
    if len(files) < 64:
        return [file_sha256(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, files))


def _identity(path: Path) -> str:
    # Any write to a file changes its modification and change times; together with the inode and size they
    # tell whether the bytes can have changed, the rule git's index and rsync rely on.
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


class FileHashes:
    """SHA-256 digests remembered per file identity in a JSON file of the workspace's cache.

    A digest is reused only while the file's device, inode, size, modification and change times are unchanged;
    a damaged memo is ignored and rebuilt.

    Args:
        memo: The JSON file, e.g. ``cache/sha256.json``.
    """

    def __init__(self, memo: Path) -> None:
        self.memo = memo
        try:
            entries = json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, dict[str, str]] = entries if isinstance(entries, dict) else {}
        self.changed = False

    def digest(self, path: Path) -> str:
        """The file's SHA-256, hashed only when the memo has none for its current identity."""
        key, identity = str(Path(path).resolve()), _identity(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = file_sha256(path)
        self.entries[key] = {"identity": identity, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Writes the memo (atomically) if a digest was added."""
        if self.changed:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.memo, self.entries)
            self.changed = False
