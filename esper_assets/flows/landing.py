"""The landing zone: where new blueprint files arrive (a directory or an S3 prefix),
and, under its ``checkpoints/`` folder, checkpoint folders (``CheckpointFolders``:
storage only; ``flows.checkpoints`` decides what they mean).

Both implementations show the same picture: the files directly under
``blueprints/``, each with a change stamp that grows when the file is written
or moved in, so a sensor can keep a high-water mark instead of a list of every
file it has seen, and a version that changes with the content (two writes can
share a stamp: S3's is whole seconds). Files that cannot be used are moved,
never deleted, to ``blueprints/rejected/`` beside a ``.error.txt`` that says why.

The directory landing zone reads, writes and moves only inside itself: it opens
``blueprints/`` and ``rejected/`` without following symlinks and works relative
to those open folders (``openat``-style ``dir_fd=`` calls, ``O_NOFOLLOW``, new
files created with ``O_EXCL``). A symlink where a folder, a reason file or a
blueprint is expected is refused with the path and what to do; nothing it
points at is touched. (Only ``ESPER_LANDING`` itself may be reached through a
symlink: that is the operator's choice of place.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Protocol

from esper_assets.errors import ConfigError, InvalidInput, StorageError, TierUnavailable
from esper_assets.storage.objects import MISSING_KEY, boto_errors, s3_error_code, s3_failure

BLUEPRINTS = "blueprints"
REJECTED = "rejected"


@dataclass(frozen=True, order=True)
class LandedFile:
    changed_ns: int  # first, so files sort by when they arrived
    key: str  # the file name inside blueprints/
    size: int
    # Changes whenever the content may have (S3: the ETag; a directory: inode, mtime,
    # ctime and size), so a new upload is seen even when its stamp did not move.
    version: str = ""


class LandingZone(Protocol):
    location: str

    def list_blueprints(self) -> list[LandedFile]: ...
    def read(self, key: str) -> bytes: ...
    def put(self, key: str, data: bytes) -> None: ...
    def reject(self, key: str, reason: str) -> str:
        """Move ``key`` to ``rejected/`` with a ``.error.txt``; return where it went."""
        ...


def _plain_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key in (".", ".."):
        raise InvalidInput(f"landing key {key!r} must be a plain file name inside blueprints/")
    return key


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO planted under a blueprint's name must not hang the reader.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


def _symlink_target(name: str, dir_fd: int | None) -> str | None:
    """Where ``name`` points if it is a symlink (relative to ``dir_fd``), else None."""
    try:
        if not stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            return None
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


class DirectoryLanding:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.folder = self.root / BLUEPRINTS
        self.location = str(self.folder)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with suppress(FileExistsError):  # a symlink there is refused just below
                os.mkdir(self.folder)
        except OSError as exc:
            raise TierUnavailable(f"landing zone {self.location}: cannot create it: {exc}") from exc
        with self._blueprints():  # refuse a symlinked blueprints/ now, not at the first tick
            pass

    def _blueprints(self):
        """``blueprints/``, opened without following a symlink there."""
        return self._folder(
            str(self.folder),
            None,
            self.folder,
            "the landing zone reads and writes only inside itself: set ESPER_LANDING to "
            "the folder that holds the real blueprints/ folder instead",
        )

    def _rejected(self, blueprints_fd: int):
        """``blueprints/rejected/``, created if missing, opened without following a symlink."""
        path = self.folder / REJECTED
        with suppress(OSError):  # exists already, or cannot be made: the open says which
            os.mkdir(REJECTED, dir_fd=blueprints_fd)
        return self._folder(
            REJECTED,
            blueprints_fd,
            path,
            f"rejected files are moved only inside the landing zone: replace it with a real "
            f"folder (rm {path} && mkdir {path}); nothing was moved",
        )

    @contextmanager
    def _folder(self, name: str, dir_fd: int | None, path: Path, if_symlink: str) -> Iterator[int]:
        """A folder's descriptor, never through a symlink: one there is refused with
        ``if_symlink`` (what the landing zone does, and what to do)."""
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
        except OSError as exc:
            target = _symlink_target(name, dir_fd)
            if target is not None:
                raise StorageError(f"{path} is a symlink (to {target}); {if_symlink}") from None
            raise TierUnavailable(
                f"landing zone {self.location}: cannot open {path}: {exc}"
            ) from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def list_blueprints(self) -> list[LandedFile]:
        files = []
        with self._blueprints() as fd, os.scandir(fd) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                # ctime moves on rename, so a file moved in with an old mtime still counts as new
                version = f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_size}"
                files.append(
                    LandedFile(max(st.st_mtime_ns, st.st_ctime_ns), entry.name, st.st_size, version)
                )
        return files

    def read(self, key: str) -> bytes:
        path = self.folder / _plain_key(key)
        with self._blueprints() as folder:
            try:
                fd = os.open(key, _READ, dir_fd=folder)
            except FileNotFoundError:
                raise InvalidInput(f"{path} is gone from the landing zone") from None
            except OSError as exc:
                target = _symlink_target(key, folder)
                if target is not None:
                    raise InvalidInput(
                        f"{path} is a symlink (to {target}); the landing zone reads only regular "
                        f"files inside itself: copy the file into {self.location} instead"
                    ) from None
                raise TierUnavailable(
                    f"landing zone {self.location}: cannot read {key}: {exc}"
                ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidInput(
                f"{path} is not a regular file; put blueprint files, not folders or devices, "
                "in the landing zone"
            )
        try:
            with open(fd, "rb") as file:
                return file.read()
        except OSError as exc:
            raise TierUnavailable(
                f"landing zone {self.location}: cannot read {key}: {exc}"
            ) from exc

    def put(self, key: str, data: bytes) -> None:
        _plain_key(key)
        with self._blueprints() as folder:
            try:
                self._write_new(folder, key, data)  # readers never see half a file
            except OSError as exc:
                raise TierUnavailable(
                    f"landing zone {self.location}: cannot write {key}: {exc}"
                ) from exc

    def reject(self, key: str, reason: str) -> str:
        rejected = self.folder / REJECTED
        target, note = _plain_key(key), f"{key}.error.txt"
        with self._blueprints() as folder, self._rejected(folder) as into:
            for name in (note, target):
                link = _symlink_target(name, into)
                if link is not None:
                    raise StorageError(
                        f"{rejected / name} is a symlink (to {link}); the landing zone writes "
                        f"only inside itself: remove it (rm {rejected / name}); {key} stays in "
                        f"{self.location} and is looked at again when it changes (touch it)"
                    )
            try:
                self._write_new(into, note, reason.rstrip().encode() + b"\n")
                os.replace(key, target, src_dir_fd=folder, dst_dir_fd=into)
            except FileNotFoundError:
                raise InvalidInput(f"{self.folder / key} is gone from the landing zone") from None
            except OSError as exc:
                raise StorageError(
                    f"landing zone {self.location}: cannot move {key} to {rejected}: {exc}"
                ) from exc
        return str(rejected / target)

    @staticmethod
    def _write_new(folder: int, name: str, data: bytes) -> None:
        """Write ``name`` in the open ``folder`` atomically: a fresh temporary file
        (``O_EXCL | O_NOFOLLOW``, so nothing planted is followed), then a rename over
        ``name`` (which replaces a symlink there, never what it points at)."""
        tmp = f".landing-{secrets.token_hex(8)}.tmp"  # dot: never listed
        fd = os.open(tmp, _NEW_FILE, 0o666, dir_fd=folder)
        try:
            with open(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise


class _S3Folder:
    """The objects under ``prefix/<name>/`` of a bucket, and the one way to call S3
    about them (errors named after the folder)."""

    name = ""

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        base = prefix.strip("/")
        self.folder = f"{base}/{self.name}/" if base else f"{self.name}/"
        self.location = f"s3://{bucket}/{self.folder}"

    def _call(self, what: str, fn, **kwargs):
        return _s3_call(self.bucket, self.location, what, fn, **kwargs)


class S3Landing(_S3Folder):
    """``s3://bucket/prefix``: blueprints are the objects under ``prefix/blueprints/``."""

    name = BLUEPRINTS

    def list_blueprints(self) -> list[LandedFile]:
        files, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            # Delimiter keeps rejected/ (and any other sub-folder) out of the listing
            page = self._call("list", self.client.list_objects_v2, Prefix=self.folder,
                              Delimiter="/", **extra)  # fmt: skip
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.folder) :]
                if name and not name.startswith("."):
                    stamp = int(obj["LastModified"].timestamp() * 1e9)
                    version = obj.get("ETag", "").strip('"')
                    files.append(LandedFile(stamp, name, obj["Size"], version))
            token = page.get("NextContinuationToken")
            if not token:
                return files

    def read(self, key: str) -> bytes:
        return self._call("read", self.client.get_object, Key=self.folder + key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self._call("write", self.client.put_object, Key=self.folder + _plain_key(key), Body=data)

    def reject(self, key: str, reason: str) -> str:
        # S3 keys may hold '/' or '..': they are kept verbatim under rejected/
        target = f"{self.folder}{REJECTED}/{key}"
        source = {"Bucket": self.bucket, "Key": self.folder + key}
        self._call("write", self.client.put_object, Key=target + ".error.txt",
                   Body=reason.rstrip().encode() + b"\n")  # fmt: skip
        self._call("move", self.client.copy_object, Key=target, CopySource=source)
        self._call("move", self.client.delete_object, Key=self.folder + key)
        return f"s3://{self.bucket}/{target}"


def _s3_call(bucket: str, location: str, what: str, fn, **kwargs):
    """``fn(Bucket=bucket, **kwargs)``; a missing key is InvalidInput naming it, any
    other failure the one botocore map's error for the landing zone at ``location``."""
    try:
        return fn(Bucket=bucket, **kwargs)
    except boto_errors() as exc:
        if s3_error_code(exc) in MISSING_KEY:
            raise InvalidInput(f"s3://{bucket}/{kwargs.get('Key', '')} is gone") from None
        raise s3_failure(exc, f"landing zone {location}", what, refused=StorageError) from exc


def _s3_location(location: str, s3_client) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix); ConfigError if unusable or no client."""
    bucket, _, prefix = location[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"ESPER_LANDING={location!r} names no bucket; use s3://bucket/prefix")
    if s3_client is None:
        raise ConfigError(
            f"landing zone {location}: no S3 client given; build it with "
            "esper_assets.flows.wiring.landing_zone(settings)"
        )
    return bucket, prefix


def landing_from_location(location: str, s3_client=None) -> LandingZone:
    """``s3://bucket/prefix`` (read through ``s3_client``, which it then needs) or a
    directory path. ``esper_assets.flows.wiring.landing_zone`` builds one from Settings,
    with the S3 client they configure."""
    if location.startswith("s3://"):
        return S3Landing(s3_client, *_s3_location(location, s3_client))
    return DirectoryLanding(location)


# -- checkpoint folders: <landing>/checkpoints/<run>/<step>/<files> --------------------------
# Storage only: which folders hold which files, reading, fetching and writing one file.
# What a folder's files mean (complete, ingested, rejected and why) is decided in
# ``esper_assets.flows.checkpoints``, once for both.
CHECKPOINTS = "checkpoints"
_COPY_BUFFER = 1 << 20  # a component is streamed to disk through this much memory


class CheckpointFolders(Protocol):
    location: str  # the checkpoints/ folder

    def folders(self) -> dict[str, frozenset[str]]:
        """``"<run>/<step>"`` -> the names of the regular files directly in it."""
        ...

    def where(self, folder: str) -> str: ...
    def read(self, folder: str, name: str) -> bytes: ...
    def local_files(self, folder: str, names: list[str]) -> AbstractContextManager[dict[str, Path]]:
        """The files ``names`` of ``folder`` as local paths, for as long as the block runs."""
        ...

    def write(self, folder: str, name: str, text: str) -> None: ...


class DirectoryCheckpoints:
    """``<landing>/checkpoints/`` on disk; symlinked run or step folders and symlinked
    files are not listed (nothing outside the landing directory is read)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root) / CHECKPOINTS
        self.location = str(self.root)

    def folders(self) -> dict[str, frozenset[str]]:
        found = {}
        for run in _real_folders(self.root):
            for step in _real_folders(run):
                files = frozenset(f.name for f in step.iterdir() if _regular(f))
                found[f"{run.name}/{step.name}"] = files
        return found

    def where(self, folder: str) -> str:
        return str(self.root / folder)

    def read(self, folder: str, name: str) -> bytes:
        try:
            return (self.root / folder / name).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{self.where(folder)}/{name} cannot be read: {exc}") from None

    @contextmanager
    def local_files(self, folder: str, names: list[str]) -> Iterator[dict[str, Path]]:
        yield {name: self.root / folder / name for name in names}  # read where they are

    def write(self, folder: str, name: str, text: str) -> None:
        (self.root / folder / name).write_text(text)


def _real_folders(path: Path) -> list[Path]:
    if not path.is_dir() or path.is_symlink():
        return []
    return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]


def _regular(path: Path) -> bool:
    return stat.S_ISREG(path.lstat().st_mode)


class S3Checkpoints(_S3Folder):
    """``s3://bucket/prefix/checkpoints/``: a folder is the objects under
    ``<run>/<step>/`` (deeper keys are not part of it). Components are streamed to a
    temporary directory, never held in memory whole."""

    name = CHECKPOINTS

    def folders(self) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list", self.client.list_objects_v2, Prefix=self.folder, **extra)
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(self.folder) :].split("/")
                if len(parts) == 3 and all(parts):
                    found.setdefault(f"{parts[0]}/{parts[1]}", set()).add(parts[2])
            token = page.get("NextContinuationToken")
            if not token:
                return {folder: frozenset(names) for folder, names in found.items()}

    def where(self, folder: str) -> str:
        return f"{self.location}{folder}/"

    def read(self, folder: str, name: str) -> bytes:
        key = f"{self.folder}{folder}/{name}"
        return self._call("read", self.client.get_object, Key=key)["Body"].read()

    @contextmanager
    def local_files(self, folder: str, names: list[str]) -> Iterator[dict[str, Path]]:
        with TemporaryDirectory(prefix="esper-landed-") as tmp:
            paths = {name: Path(tmp) / name for name in names}  # a file two components share: once
            for name, path in paths.items():
                self._download(f"{self.folder}{folder}/{name}", path)
            yield paths

    def _download(self, key: str, path: Path) -> None:
        body = self._call("read", self.client.get_object, Key=key)["Body"]
        try:
            with open(path, "xb") as file:
                shutil.copyfileobj(body, file, _COPY_BUFFER)
        except boto_errors() as exc:  # the connection failed part-way through the body
            raise s3_failure(exc, f"landing zone {self.location}", "read") from exc
        finally:
            body.close()

    def write(self, folder: str, name: str, text: str) -> None:
        key = f"{self.folder}{folder}/{name}"
        self._call("write", self.client.put_object, Key=key, Body=text.encode())


def checkpoint_folders(location: str, s3_client=None) -> CheckpointFolders:
    """The checkpoints/ folder of the landing zone ``location`` (ESPER_LANDING): a
    directory, or ``s3://bucket/prefix`` read through ``s3_client``."""
    if location.startswith("s3://"):
        return S3Checkpoints(s3_client, *_s3_location(location, s3_client))
    return DirectoryCheckpoints(location)
