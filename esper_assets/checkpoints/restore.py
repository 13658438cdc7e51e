"""Restoring manifest files into a directory, all or nothing.

Each file is streamed chunk by chunk (fetched in parallel and verified by the chunk
store) into a temporary name beside its target, hashed on the way and checked
against the manifest's blake3. Only when every file is complete and matches are
they renamed into place; on any error the temporaries (and the directories we
made) are removed, so the destination never holds part of a checkpoint.

May import: ``esper_assets.errors``, ``storage.chunks``, numpy.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from esper_assets.errors import InvalidCheckpoint, RestoreRefused
from esper_assets.storage.chunks import ChunkStore

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass
class RestoreReport:
    run_id: str
    step: int
    dest: Path
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    chunks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "step": self.step, "dest": str(self.dest),
                "files": [str(f) for f in self.files], "bytes": self.bytes,
                "chunks": self.chunks}  # fmt: skip


def refuse_non_empty(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise RestoreRefused(f"restore destination {dest} exists and is not a directory")
    if not force and dest.is_dir() and any(dest.iterdir()):
        raise RestoreRefused(
            f"restore destination {dest} is not empty; pass force=True (--force) to "
            "overwrite the files the checkpoint holds"
        )


def restore_files(
    chunks: ChunkStore,
    files: list[tuple[str, dict[str, Any]]],
    report: RestoreReport,
    progress: Progress | None = None,
    workers: int = 8,
) -> RestoreReport:
    """Write each (component, file entry) to ``dest/component/path``; see the module."""
    total = sum(entry["size"] for _, entry in files)
    done = 0
    made_dirs: list[Path] = []
    written: list[tuple[Path, Path]] = []  # (temporary, target)
    try:
        _make_dir(report.dest, made_dirs)
        for component, entry in files:
            target = report.dest / component / entry["path"]
            _make_dir(target.parent, made_dirs)
            temporary = target.parent / f".{entry['path']}.{uuid.uuid4().hex[:8]}.partial"
            written.append((temporary, target))
            for n in _write_file(chunks, entry, temporary, f"{component}/{entry['path']}", workers):
                done += n
                if progress is not None:
                    progress(done, total)
        for temporary, target in written:
            os.replace(temporary, target)
    except BaseException:
        _clean(written, made_dirs)
        raise
    report.files = [target for _, target in written]
    report.bytes = total
    report.chunks = sum(len(entry["chunks"]) for _, entry in files)
    return report


def _write_file(
    chunks: ChunkStore, entry: dict[str, Any], temporary: Path, what: str, workers: int
) -> Iterable[int]:
    """Stream ``entry``'s chunks into ``temporary``; yields the bytes of each chunk."""
    hasher = blake3.blake3()
    addresses = [address for address, _ in entry["chunks"]]
    with open(temporary, "xb") as fh:
        pieces = chunks.get_many(addresses, workers=workers)
        for (address, size), data in zip(entry["chunks"], pieces, strict=True):
            if len(data) != size:
                raise InvalidCheckpoint(
                    f"{what}: chunk {address} holds {len(data)} bytes, the manifest says {size}"
                )
            hasher.update(data)
            fh.write(data)
            yield size
        fh.flush()
        os.fsync(fh.fileno())
    if hasher.hexdigest() != entry["blake3"]:
        raise InvalidCheckpoint(f"{what}: the restored bytes do not match the manifest's blake3")


def read_file(chunks: ChunkStore, entry: dict[str, Any], what: str, workers: int = 8) -> bytearray:
    """``entry``'s bytes in memory (for loading its tensors), verified like a restore."""
    buffer = bytearray(entry["size"])
    hasher, position = blake3.blake3(), 0
    pieces = chunks.get_many([a for a, _ in entry["chunks"]], workers=workers)
    for (address, size), data in zip(entry["chunks"], pieces, strict=True):
        if len(data) != size:
            raise InvalidCheckpoint(f"{what}: chunk {address} has the wrong size")
        buffer[position : position + size] = data
        hasher.update(data)
        position += size
    if hasher.hexdigest() != entry["blake3"]:
        raise InvalidCheckpoint(f"{what}: the bytes do not match the manifest's blake3")
    return buffer


def _make_dir(path: Path, made: list[Path]) -> None:
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        made.append(directory)


def _clean(written: list[tuple[Path, Path]], made_dirs: list[Path]) -> None:
    for temporary, _ in written:
        temporary.unlink(missing_ok=True)
    for directory in reversed(made_dirs):
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            directory.rmdir()
