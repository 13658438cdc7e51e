"""Restoring manifest files into a directory, all or nothing.

Each file's chunks are fetched and verified in parallel by the chunk store's
workers, each writing its chunk at its offset of a temporary file beside the target
(a file is its chunks in order, and each chunk hashes to its address, so verifying
every chunk verifies the file: its digest is the hash of that list, checked when the
manifest is read). The file is flushed to disk; only when every file is complete
are they renamed into place; on any error the temporaries (and the directories we
made) are removed, so the destination never holds part of a checkpoint.

May import: ``esper_assets.errors``, ``storage.chunks``, ``storage.objects``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from esper_assets.errors import InvalidCheckpoint, RestoreRefused
from esper_assets.storage.chunks import ChunkStore
from esper_assets.storage.objects import start_writeback

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
    workers: int = 4,
) -> RestoreReport:
    """Write each (component, file entry) to ``dest/component/path``; see the module."""
    total = sum(entry["size"] for _, entry in files)
    done = 0
    made_dirs: list[Path] = []
    written: list[tuple[Path, Path]] = []  # (temporary, target)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    try:
        _make_dir(report.dest, made_dirs)
        for component, entry in files:
            target = report.dest / component / entry["path"]
            _make_dir(target.parent, made_dirs)
            temporary = target.parent / f".{entry['path']}.{uuid.uuid4().hex[:8]}.partial"
            written.append((temporary, target))
            what = f"{component}/{entry['path']}"
            _write_file(chunks, entry, temporary, what, workers, advance)
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
    chunks: ChunkStore,
    entry: dict[str, Any],
    temporary: Path,
    what: str,
    workers: int,
    advance: Callable[[int], None],
) -> None:
    """Fetch ``entry``'s chunks in parallel, each worker writing its chunk at its
    offset of ``temporary``; then flush it to disk."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        offsets = _offsets(entry)

        def deliver(i: int, data: bytes | memoryview) -> None:
            _check_size(entry, i, data, what)
            _pwrite_all(fd, data, offsets[i])
            start_writeback(fd, offsets[i], len(data))  # the fsync below waits less

        for i in chunks.read_many([a for a, _ in entry["chunks"]], deliver, workers):
            advance(entry["chunks"][i][1])
        os.fsync(fd)
    finally:
        os.close(fd)
    if "digest" not in entry:  # a version 1 manifest: a hash of the whole file
        with open(temporary, "rb") as fh:
            _check_whole_file(entry, fh, what)


def read_file(chunks: ChunkStore, entry: dict[str, Any], what: str, workers: int = 4) -> bytearray:
    """``entry``'s bytes in memory (for loading its tensors), verified like a restore."""
    buffer = bytearray(entry["size"])
    offsets = _offsets(entry)

    def deliver(i: int, data: bytes | memoryview) -> None:
        _check_size(entry, i, data, what)
        buffer[offsets[i] : offsets[i] + len(data)] = data

    for _ in chunks.read_many([a for a, _ in entry["chunks"]], deliver, workers):
        pass
    if "digest" not in entry:
        _check_whole_file(entry, io.BytesIO(buffer), what)
    return buffer


def _offsets(entry: dict[str, Any]) -> list[int]:
    """Where each chunk starts in its file."""
    return list(itertools.accumulate((size for _, size in entry["chunks"]), initial=0))[:-1]


def _check_size(entry: dict[str, Any], i: int, data: bytes | memoryview, what: str) -> None:
    address, size = entry["chunks"][i]
    if len(data) != size:
        raise InvalidCheckpoint(
            f"{what}: chunk {address} holds {len(data)} bytes, the manifest says {size}"
        )


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _check_whole_file(entry: dict[str, Any], stream, what: str) -> None:
    """Version 1 manifests hash the whole file: read it back and compare."""
    hasher = blake3.blake3()
    while block := stream.read(1 << 22):
        hasher.update(block)
    if hasher.hexdigest() != entry["blake3"]:
        raise InvalidCheckpoint(f"{what}: the restored bytes do not match the manifest's blake3")


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
