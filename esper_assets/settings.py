"""Settings from the environment, validated once, with embedded defaults.

With no ``ESPER_*`` service variables set everything runs on one machine: a
SQLite file for L3 and metadata, a directory for L4 and large objects, no L2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from esper_assets.errors import ConfigError, redact_url

# The variables that point esper at services (or at a Dagster instance): with none of
# them set, everything runs embedded under ESPER_HOME.
SERVICE_VARIABLES = (
    "ESPER_DATABASE_URL", "ESPER_REDIS_URL", "ESPER_S3_BUCKET", "AWS_ENDPOINT_URL",
    "ESPER_LANDING", "DAGSTER_HOME",
)  # fmt: skip

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str | None  # None: embedded SQLite file under ``home``
    redis_url: str | None  # None: no L2
    s3_bucket: str | None  # None: object store is a directory under ``home``
    s3_prefix: str
    aws_endpoint_url: str | None
    landing: str

    @property
    def sqlite_path(self) -> Path:
        return self.home / "esper.sqlite3"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    @property
    def uses_postgres(self) -> bool:
        return self.database_url is not None

    def describe(self) -> dict[str, str]:
        """What each backend is, safe to print or log (no passwords)."""
        return {
            "home": str(self.home),
            "l3_and_metadata": redact_url(self.database_url) or f"sqlite:///{self.sqlite_path}",
            "l2": redact_url(self.redis_url) or "off",
            "object_store": (
                f"s3://{self.s3_bucket}/{self.s3_prefix}"
                if self.s3_bucket
                else str(self.objects_dir)
            ),
            "landing": self.landing,
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        home = Path(get("ESPER_HOME") or ".esper").expanduser().resolve()
        database_url = _check_url(
            "ESPER_DATABASE_URL",
            get("ESPER_DATABASE_URL"),
            {"postgresql", "postgres"},
            "use postgresql://user@host:5432/db, or unset it for the embedded SQLite file",
        )
        redis_url = _check_url(
            "ESPER_REDIS_URL",
            get("ESPER_REDIS_URL"),
            {"redis", "rediss", "unix"},
            "use redis://host:6379/0, or unset it to run without L2",
        )
        bucket = get("ESPER_S3_BUCKET")
        if bucket is not None and not _BUCKET.match(bucket):
            raise ConfigError(
                f"ESPER_S3_BUCKET={bucket!r} is not a valid S3 bucket name "
                "(3-63 characters: lower-case letters, digits, '.' and '-'); "
                "fix it, or unset it to keep objects in a local directory"
            )
        endpoint = _check_url(
            "AWS_ENDPOINT_URL",
            get("AWS_ENDPOINT_URL"),
            {"http", "https"},
            "use http(s)://host:port, or unset it for AWS itself",
        )
        prefix = (get("ESPER_S3_PREFIX") or "esper").strip("/")
        landing = get("ESPER_LANDING") or str(home / "landing")
        return cls(
            home=home,
            database_url=database_url,
            redis_url=redis_url,
            s3_bucket=bucket,
            s3_prefix=prefix,
            aws_endpoint_url=endpoint,
            landing=landing,
        )


def _check_url(variable: str, url: str | None, schemes: set[str], advice: str) -> str | None:
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(
            f"{variable}={redact_url(url)!r} is not a valid URL ({exc}); {advice}"
        ) from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{variable}={redact_url(url)!r} has scheme {parts.scheme!r}, expected one of "
            f"{sorted(schemes)}; {advice}"
        )
    if parts.scheme != "unix" and not parts.hostname and variable != "ESPER_DATABASE_URL":
        raise ConfigError(f"{variable}={redact_url(url)!r} names no host; {advice}")
    return url
