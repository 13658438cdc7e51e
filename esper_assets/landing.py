"""The landing zone: where new blueprint files arrive (a directory or an S3 prefix).

Both implementations show the same picture: the files directly under
``blueprints/``, each with a change stamp that grows when the file is written
or moved in, so a sensor can keep a high-water mark instead of a list of every
file it has seen. Files that cannot be used are moved, never deleted, to
``blueprints/rejected/`` beside a ``.error.txt`` that says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from esper_assets.errors import ConfigError, InvalidInput, StorageError, TierUnavailable

BLUEPRINTS = "blueprints"
REJECTED = "rejected"


@dataclass(frozen=True, order=True)
class LandedFile:
    changed_ns: int  # first, so files sort by when they arrived
    key: str  # the file name inside blueprints/
    size: int


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


class DirectoryLanding:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.folder = self.root / BLUEPRINTS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.location = str(self.folder)

    def list_blueprints(self) -> list[LandedFile]:
        files = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                # ctime moves on rename, so a file moved in with an old mtime still counts as new
                files.append(
                    LandedFile(max(st.st_mtime_ns, st.st_ctime_ns), entry.name, st.st_size)
                )
        return files

    def read(self, key: str) -> bytes:
        try:
            return (self.folder / _plain_key(key)).read_bytes()
        except FileNotFoundError:
            raise InvalidInput(f"{self.folder / key} is gone from the landing zone") from None
        except OSError as exc:
            raise TierUnavailable(
                f"landing zone {self.location}: cannot read {key}: {exc}"
            ) from exc

    def put(self, key: str, data: bytes) -> None:
        target = self.folder / _plain_key(key)
        tmp = self.folder / f".{key}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)  # readers never see half a file

    def reject(self, key: str, reason: str) -> str:
        rejected = self.folder / REJECTED
        rejected.mkdir(exist_ok=True)
        target = rejected / key
        (rejected / f"{key}.error.txt").write_text(reason.rstrip() + "\n")
        os.replace(self.folder / key, target)
        return str(target)


class S3Landing:
    """``s3://bucket/prefix``: blueprints are the objects under ``prefix/blueprints/``."""

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        base = prefix.strip("/")
        self.folder = f"{base}/{BLUEPRINTS}/" if base else f"{BLUEPRINTS}/"
        self.location = f"s3://{bucket}/{self.folder}"

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise InvalidInput(f"{self.location}{kwargs.get('Key', '')} is gone") from None
            raise StorageError(f"landing zone {self.location}: {what} failed: {code}") from exc
        except BotoCoreError as exc:
            raise TierUnavailable(f"landing zone {self.location}: {what} failed: {exc}") from exc

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
                    files.append(LandedFile(stamp, name, obj["Size"]))
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


def landing_from_location(location: str, s3_client=None) -> LandingZone:
    """``s3://bucket/prefix`` or a directory path."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"ESPER_LANDING={location!r} names no bucket; use s3://bucket/prefix")
        if s3_client is None:
            from esper_assets.storage.object_store import make_s3_client

            s3_client = make_s3_client(os.environ.get("AWS_ENDPOINT_URL") or None)
        return S3Landing(s3_client, bucket, prefix)
    return DirectoryLanding(location)
