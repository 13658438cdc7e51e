"""Settings from the environment, validated once, with embedded defaults.

With no ``ESPER_*`` service variables set everything runs on one machine: a
SQLite file for L3 and metadata, a directory for L4 and large objects, no L2.
``ESPER_REQUIRE_SERVICES=1`` (every machine of a cluster) turns that fallback into a
ConfigError naming each missing variable.

This module is the only reader of esper's environment variables (``ESPER_*``,
``AWS_ENDPOINT_URL`` and, for ``esper serve``, ``PROMETHEUS_MULTIPROC_DIR``); everything
else takes a :class:`Settings`, and
``esper_assets.flows.wiring`` turns one into storage objects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from esper_assets.errors import ConfigError, redact_url

# The variables that point esper at services (or at a Dagster instance): with none of
# them set, everything runs embedded under ESPER_HOME (ESPER_REQUIRE_SERVICES refuses to).
SERVICE_VARIABLES = (
    "ESPER_DATABASE_URL", "ESPER_REDIS_URL", "ESPER_S3_BUCKET", "AWS_ENDPOINT_URL",
    "ESPER_LANDING", "DAGSTER_HOME", "ESPER_REQUIRE_SERVICES",
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
    # Checkpoint retention (ESPER_CHECKPOINT_*; "off" turns a keep rule off): see
    # checkpoints.retention.RetentionPolicy.from_settings.
    checkpoint_keep_last: int | None = 5
    checkpoint_keep_every: int | None = None
    checkpoint_keep_days: float | None = 7.0
    checkpoint_retention_action: str = "archive"
    checkpoint_gc_grace_hours: float = 1.0
    # Usage events (ESPER_USAGE on|off, ESPER_USAGE_FLUSH_S): see analytics.events.
    usage: bool = True
    usage_flush_s: float = 60.0
    # The bearer token of ``esper serve``'s mutating routes (ESPER_API_TOKEN); None: those
    # routes are refused. Kept out of repr and describe(): never logged or echoed.
    api_token: str | None = field(default=None, repr=False)
    # Where ``esper serve``'s workers keep their metric files (PROMETHEUS_MULTIPROC_DIR,
    # emptied of an earlier run's files when it starts); None: a fresh one for each run.
    metrics_dir: Path | None = None

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
        redis_url = _check_redis_url(get("ESPER_REDIS_URL"))
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
        _check_required_services(get, database_url, bucket, landing)
        return cls(
            home=home,
            database_url=database_url,
            redis_url=redis_url,
            s3_bucket=bucket,
            s3_prefix=prefix,
            aws_endpoint_url=endpoint,
            landing=landing,
            **_checkpoint_retention(get),
            **_usage(get),
            api_token=get("ESPER_API_TOKEN"),
            metrics_dir=_path(get("PROMETHEUS_MULTIPROC_DIR")),
        )


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _check_required_services(get, database_url, bucket, landing: str) -> None:
    """ESPER_REQUIRE_SERVICES (1/true/yes/on or 0/false/no/off, default off): on, as on
    every machine of a cluster, a missing service is a ConfigError naming each missing
    variable, instead of the embedded fallback to files only this machine can see."""
    switch = (get("ESPER_REQUIRE_SERVICES") or "off").lower()
    if switch not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(
            f"ESPER_REQUIRE_SERVICES={switch!r} must be 1/true/yes/on (a cluster: refuse to "
            "run without the services) or 0/false/no/off; or unset it (off)"
        )
    if switch in ("0", "false", "no", "off"):
        return
    missing = []
    if database_url is None:
        missing.append("ESPER_DATABASE_URL (postgresql://user@host:5432/db)")
    if bucket is None:
        missing.append("ESPER_S3_BUCKET (the bucket for L4 and large objects)")
    if not landing.startswith("s3://"):
        shown = f"is {redact_url(landing)!r}" if get("ESPER_LANDING") else "is unset"
        missing.append(f"ESPER_LANDING (s3://bucket/prefix; it {shown})")
    if missing:
        raise ConfigError(
            "ESPER_REQUIRE_SERVICES is on, so esper will not fall back to local files, but "
            f"these are missing: {'; '.join(missing)}. Set them on this machine (a run "
            "worker gets them from the deployment's secret and config map), or unset "
            "ESPER_REQUIRE_SERVICES to run on one machine with everything under ESPER_HOME"
        )


def _usage(get) -> dict:
    """ESPER_USAGE (on|off, default on) and ESPER_USAGE_FLUSH_S (seconds > 0, default 60)."""
    switch = (get("ESPER_USAGE") or "on").lower()
    if switch not in ("on", "off"):
        raise ConfigError(f"ESPER_USAGE={switch!r} must be on or off; or unset it (on)")
    text = get("ESPER_USAGE_FLUSH_S")
    try:
        flush_s = 60.0 if text is None else float(text)
    except ValueError:
        flush_s = float("nan")
    if not flush_s > 0 or flush_s == float("inf"):
        raise ConfigError(
            f"ESPER_USAGE_FLUSH_S={text!r} must be a number of seconds > 0; or unset it (60)"
        )
    return {"usage": switch == "on", "usage_flush_s": flush_s}


def _checkpoint_retention(get) -> dict:
    """The ESPER_CHECKPOINT_* variables: unset keeps the default, "off" turns a keep
    rule off, anything else must be a number in range (ConfigError naming it)."""

    def number(name: str, kind: type, low: float, default, can_be_off: bool = True):
        text = get(name)
        if text is None:
            return default
        if can_be_off and text.lower() == "off":
            return None
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low or value != value:
            off = ', or "off"' if can_be_off else ""
            raise ConfigError(f"{name}={text!r} must be a number >= {low:g}{off}; or unset it")
        return value

    action = (get("ESPER_CHECKPOINT_RETENTION_ACTION") or "archive").lower()
    if action not in ("archive", "delete"):
        raise ConfigError(
            f"ESPER_CHECKPOINT_RETENTION_ACTION={action!r} must be archive or delete; or unset it"
        )
    return {
        "checkpoint_keep_last": number("ESPER_CHECKPOINT_KEEP_LAST", int, 0, 5),
        "checkpoint_keep_every": number("ESPER_CHECKPOINT_KEEP_EVERY", int, 1, None),
        "checkpoint_keep_days": number("ESPER_CHECKPOINT_KEEP_DAYS", float, 0, 7.0),
        "checkpoint_retention_action": action,
        "checkpoint_gc_grace_hours": number(
            "ESPER_CHECKPOINT_GC_GRACE_HOURS", float, 0, 1.0, can_be_off=False
        ),
    }


def variable_holds(name: str, value: str | None) -> bool:
    """Whether the environment variable ``name`` is set to ``value`` (as ``from_env``
    reads it). The Dagster resources name such a variable (``dg.EnvVar``) instead of
    holding its value, so a password is resolved inside the run and shown nowhere."""
    return bool(value) and os.environ.get(name, "").strip() == value


_ENCODE_ADVICE = (
    "percent-encode special characters in the user name and password "
    "('@' as %40, '/' as %2F, ':' as %3A, '?' as %3F, '#' as %23, '%' as %25; "
    "urllib.parse.quote(password, safe='') does it)"
)
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})|%00")


_REDIS_ADVICE = (
    "use redis://host:6379/0, or redis+cluster://host:7000,host:7001 for a Redis Cluster, "
    "or unset it to run without L2"
)


def _check_redis_url(url: str | None) -> str | None:
    """ESPER_REDIS_URL: one server (``redis``, ``rediss``, ``unix``) or a Redis Cluster
    (``redis+cluster``, ``rediss+cluster``) named by one or more of its nodes, comma
    separated; each node is checked as the URL of one server would be."""
    variable = "ESPER_REDIS_URL"
    scheme, sep, rest = (url or "").partition("://")
    if not sep or scheme.lower() not in ("redis+cluster", "rediss+cluster"):
        return _check_url(variable, url, {"redis", "rediss", "unix"}, _REDIS_ADVICE)
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    for host in hosts.split(","):
        single = f"{scheme.lower().removesuffix('+cluster')}://{userinfo}{at}{host}{slash}{path}"
        try:
            _check_url(variable, single, {"redis", "rediss"}, _REDIS_ADVICE)
        except ConfigError as exc:
            raise ConfigError(
                f"{variable}={redact_url(url)!r}: cluster node {host!r}: {exc}"
            ) from None
    if path.split("?", 1)[0] not in ("", "0"):
        raise ConfigError(
            f"{variable}={redact_url(url)!r} names database {path!r}; a Redis Cluster has "
            "database 0 only: drop the path"
        )
    return url


def _check_url(variable: str, url: str | None, schemes: set[str], advice: str) -> str | None:
    """``url`` if it is a URL with one of ``schemes``; else a ConfigError that names
    ``variable`` and shows the value with every password fragment hidden. Nothing
    derived from the raw value (urlsplit's messages quote parts of it) reaches a message."""
    if url is None:
        return None
    shown = redact_url(url)
    if "://" not in url and "=" in url:
        raise ConfigError(
            f"{variable}={shown!r} looks like a key=value connection string; esper takes a "
            f"URL here: {advice} ({_ENCODE_ADVICE})"
        )
    if url.count("@") > 1:
        raise ConfigError(
            f"{variable}={shown!r} holds more than one '@', so where the password ends is "
            f"ambiguous; {_ENCODE_ADVICE}"
        )
    if _BAD_PERCENT.search(url):
        raise ConfigError(
            f"{variable}={shown!r} holds a '%' that is not followed by two hex digits "
            f"(or encodes NUL); {_ENCODE_ADVICE}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
        unparsable = None
    except ValueError as exc:  # its message quotes parts of the value: never shown, not chained
        unparsable = (
            "its port is not a number from 0 to 65535"
            if "Port" in str(exc)
            else "its host cannot be parsed"
        )
    if unparsable:
        hint = f"; if the password holds one of @ / : ? #, {_ENCODE_ADVICE}" if "@" in url else ""
        raise ConfigError(f"{variable}={shown!r} is not a valid URL: {unparsable}{hint}; {advice}")
    if "@" in url and "@" not in parts.netloc:
        raise ConfigError(
            f"{variable}={shown!r} holds an '@' after its host, so the user name or password "
            f"holds one of / ? # unencoded (or a value does); {_ENCODE_ADVICE}"
        )
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{variable}={shown!r} has scheme {parts.scheme!r}, expected one of "
            f"{sorted(schemes)}; {advice}"
        )
    if parts.scheme != "unix" and not parts.hostname and variable != "ESPER_DATABASE_URL":
        raise ConfigError(f"{variable}={shown!r} names no host; {advice}")
    return url
