"""Settings.from_env (esper_assets.settings) and redact_url (esper_assets.errors).

Covers: embedded defaults (no database, no Redis, SQLite file and objects directory
under ESPER_HOME); accepted service URLs; every bad variable raising ConfigError
whose message names the variable; passwords never appearing in error messages
or in describe(); redact_url itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esper_assets.errors import ConfigError, redact_url
from esper_assets.settings import Settings

PASSWORD = "hunter2-Sekr3t"


def settings_with(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"ESPER_HOME": str(tmp_path), **env})


# -- defaults -------------------------------------------------------------------------------
def test_defaults_are_embedded_under_esper_home(tmp_path):
    s = settings_with(tmp_path)
    assert s.home == tmp_path.resolve()
    assert s.database_url is None
    assert s.uses_postgres is False
    assert s.redis_url is None
    assert s.s3_bucket is None
    assert s.aws_endpoint_url is None
    assert s.sqlite_path == tmp_path.resolve() / "esper.sqlite3"
    assert s.objects_dir == tmp_path.resolve() / "objects"
    assert s.s3_prefix == "esper"
    assert s.landing == str(tmp_path.resolve() / "landing")


def test_describe_of_defaults(tmp_path):
    described = settings_with(tmp_path).describe()
    assert described["l2"] == "off"
    assert described["l3_and_metadata"] == f"sqlite:///{tmp_path.resolve() / 'esper.sqlite3'}"
    assert described["object_store"] == str(tmp_path.resolve() / "objects")


def test_without_esper_home_home_is_dot_esper_in_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).home == tmp_path.resolve() / ".esper"


def test_esper_home_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({"ESPER_HOME": "~/esper"}).home == tmp_path.resolve() / "esper"


def test_blank_variables_count_as_unset(tmp_path):
    s = settings_with(tmp_path, ESPER_DATABASE_URL="  ", ESPER_REDIS_URL="", ESPER_S3_BUCKET=" \t")
    assert (s.database_url, s.redis_url, s.s3_bucket) == (None, None, None)


# -- services -------------------------------------------------------------------------------
def test_service_urls_are_accepted(tmp_path):
    s = settings_with(
        tmp_path,
        ESPER_DATABASE_URL="postgresql://esper@db.internal:5432/esper",
        ESPER_REDIS_URL="redis://cache.internal:6379/0",
        ESPER_S3_BUCKET="esper-kernels.prod",
        ESPER_S3_PREFIX="/team/a/",
        AWS_ENDPOINT_URL="http://minio:9000",
    )
    assert s.uses_postgres
    assert s.redis_url == "redis://cache.internal:6379/0"
    assert s.s3_prefix == "team/a"
    assert s.describe()["object_store"] == "s3://esper-kernels.prod/team/a"


@pytest.mark.parametrize(
    "url",
    ["postgres://u@h/db", "postgresql:///esper", "postgresql://u@h:6543/db?sslmode=require"],
)
def test_accepted_database_urls(tmp_path, url):
    assert settings_with(tmp_path, ESPER_DATABASE_URL=url).database_url == url


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://h:6380/1", "unix:///run/redis/redis.sock"]
)
def test_accepted_redis_urls(tmp_path, url):
    assert settings_with(tmp_path, ESPER_REDIS_URL=url).redis_url == url


# -- bad variables ----------------------------------------------------------------------------
BAD_VARIABLES = [
    ("ESPER_DATABASE_URL", "mysql://root@db/esper"),
    ("ESPER_DATABASE_URL", "postgresql://u@h:notaport/db"),
    ("ESPER_REDIS_URL", "http://cache:6379"),
    ("ESPER_REDIS_URL", "redis://cache:99999/0"),
    ("ESPER_REDIS_URL", "redis://cache:port/0"),
    ("ESPER_REDIS_URL", "redis:///0"),
    ("ESPER_S3_BUCKET", "Bad_Bucket!"),
    ("ESPER_S3_BUCKET", "ab"),
    ("ESPER_S3_BUCKET", "x" * 64),
    ("AWS_ENDPOINT_URL", "ftp://x"),
    ("AWS_ENDPOINT_URL", "http://minio:9o00"),
    ("AWS_ENDPOINT_URL", "minio:9000"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VARIABLES)
def test_bad_variable_raises_config_error_naming_it(tmp_path, variable, value):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, **{variable: value})
    assert variable in str(info.value)


URLS_WITH_PASSWORD = [
    ("ESPER_DATABASE_URL", f"mysql://root:{PASSWORD}@db/esper"),
    ("ESPER_DATABASE_URL", f"postgresql://esper:{PASSWORD}@db:port/esper"),
    ("ESPER_REDIS_URL", f"http://default:{PASSWORD}@cache:6379"),
    ("ESPER_REDIS_URL", f"redis://:{PASSWORD}@cache:123456/0"),
    ("ESPER_REDIS_URL", f"redis://:{PASSWORD}@/0"),
    ("AWS_ENDPOINT_URL", f"ftp://key:{PASSWORD}@minio"),
]


@pytest.mark.parametrize(("variable", "value"), URLS_WITH_PASSWORD)
def test_password_never_appears_in_config_error(tmp_path, variable, value):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, **{variable: value})
    message = str(info.value)
    assert variable in message
    assert PASSWORD not in message
    assert "***" in message


def test_password_never_appears_in_describe(tmp_path):
    s = settings_with(
        tmp_path,
        ESPER_DATABASE_URL=f"postgresql://esper:{PASSWORD}@db:5432/esper",
        ESPER_REDIS_URL=f"rediss://default:{PASSWORD}@cache:6380/0",
    )
    described = s.describe()
    assert PASSWORD not in repr(described)
    assert described["l3_and_metadata"] == "postgresql://esper:***@db:5432/esper"
    assert described["l2"] == "rediss://default:***@cache:6380/0"
    assert s.database_url == f"postgresql://esper:{PASSWORD}@db:5432/esper"  # still usable


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        (
            "ESPER_DATABASE_URL",
            f"postgresql://esper@db/esper?password={PASSWORD}",
            "l3_and_metadata",
        ),
        ("ESPER_REDIS_URL", f"redis://cache:6379/0?password={PASSWORD}", "l2"),
    ],
)
def test_query_string_password_never_appears_in_describe(tmp_path, variable, value, key):
    described = settings_with(tmp_path, **{variable: value}).describe()
    assert PASSWORD not in described[key]


# -- redact_url ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:p%40ss@h", "rediss://default:***@h"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),  # no password: unchanged
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
        ("", ""),
        (None, ""),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


# -- every fragment of a password stays hidden (issue 8) -----------------------------------------
# A password made of distinctive parts: whatever separator a URL or DSN parser splits it
# at, none of the parts may show up in a message.
PARTS = ("Zq9xA", "Kw7vB", "Jm3tC")


def assert_no_fragment(text: str) -> None:
    leaked = [part for part in PARTS if part in text]
    assert not leaked, f"password fragments {leaked} visible in: {text}"


HOSTILE_CONFIG = [
    # libpq key=value connection strings
    ("ESPER_DATABASE_URL", "host=db user=u password=Zq9xA dbname=x"),
    ("ESPER_DATABASE_URL", "host=db user=u password = Zq9xA dbname=x"),
    ("ESPER_DATABASE_URL", r"host=db password='Zq9xA Kw7vB\' Jm3tC' dbname=x"),
    ("ESPER_DATABASE_URL", "host=db password='Zq9xA Kw7vB"),  # unterminated quote
    ("ESPER_DATABASE_URL", "dbname=x PASSWORD=Zq9xA@Kw7vB/Jm3tC"),
    ("ESPER_DATABASE_URL", "host=db sslpassword=Zq9xA"),
    # unencoded '@', '/', '#', '?' in a URL password
    ("ESPER_DATABASE_URL", "postgresql://u:Zq9xA@Kw7vB/Jm3tC@host/db"),
    ("ESPER_DATABASE_URL", "postgresql://u:Zq9xA/Kw7vB@host:5432/db"),
    ("ESPER_DATABASE_URL", "postgresql://u:Zq9xA#Kw7vB@host/db"),
    ("ESPER_DATABASE_URL", "postgresql://u:Zq9xA?Kw7vB@host/db"),
    ("ESPER_DATABASE_URL", "postgresql://me@corp.com:Zq9xA@host/db"),
    ("ESPER_DATABASE_URL", "postgresql://u:Zq9xA:Kw7vB@host/db@x"),
    ("ESPER_DATABASE_URL", "u:Zq9xA@host/db"),  # no scheme
    ("ESPER_DATABASE_URL", "mysql://u@h/db?password=Zq9xA#Kw7vB&x=1"),
    ("ESPER_DATABASE_URL", "postgresql://u@h:bad/db?sslpassword=Zq9xA/Kw7vB&x=1"),
    ("ESPER_REDIS_URL", "redis://:Zq9xA@Kw7vB@cache:6379/0"),
    ("ESPER_REDIS_URL", "redis://default:Zq9xA/Kw7vB@cache:6379/0"),
    ("ESPER_REDIS_URL", "redis://cache:port/0?password=Zq9xA"),
    ("AWS_ENDPOINT_URL", "http://key:Zq9xA/Kw7vB@minio:9000"),
]


@pytest.mark.parametrize(("variable", "value"), HOSTILE_CONFIG)
def test_no_password_fragment_in_config_error(tmp_path, variable, value):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, **{variable: value})
    message = str(info.value)
    assert variable in message
    assert "***" in message
    assert_no_fragment(message)
    assert_no_fragment(repr(info.value))
    chained = info.value.__cause__ or info.value.__context__  # tracebacks print these too
    assert chained is None or not any(part in repr(chained) for part in PARTS)


def test_key_value_dsn_error_says_what_to_use_instead(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_DATABASE_URL="host=db user=u password=Zq9xA dbname=x")
    message = str(info.value)
    assert "key=value" in message and "postgresql://" in message
    assert "host=db user=u password=*** dbname=x" in message  # the rest stays readable


def test_unencoded_at_sign_in_password_is_refused_with_advice(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_DATABASE_URL="postgresql://u:Zq9xA@Kw7vB/Jm3tC@host/db")
    message = str(info.value)
    assert "%40" in message and "percent-encode" in message
    assert_no_fragment(message)


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        (
            "ESPER_DATABASE_URL",
            "postgresql://esper@db/esper?password=Zq9xA#Kw7vB",
            "l3_and_metadata",
        ),
        ("ESPER_DATABASE_URL", "postgresql://esper:Zq9xA%40Kw7vB@db/esper", "l3_and_metadata"),
        ("ESPER_REDIS_URL", "redis://cache:6379/0?x=1&password=Zq9xA#Kw7vB", "l2"),
    ],
)
def test_accepted_urls_describe_without_any_password_fragment(tmp_path, variable, value, key):
    described = settings_with(tmp_path, **{variable: value}).describe()
    assert_no_fragment(repr(described))
    assert "***" in described[key]


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("postgresql://u:p@ss/w0rd@host/db", "postgresql://u:***@host/db"),
        ("postgresql://me@corp.com:pw@host/db", "postgresql://me@corp.com:***@host/db"),
        ("redis://:a/b#c@h:6379/0", "redis://:***@h:6379/0"),
        ("u:pw@host/db", "u:***@host/db"),
        (
            "postgresql://u@h/db?password=a#b&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("host=db user=u password=s3cret dbname=x", "host=db user=u password=*** dbname=x"),
        ("host=db password = 's3 c\\'ret' dbname=x", "host=db password = *** dbname=x"),
        ("host=db password='s3 cret", "host=db password=***"),
        ("host=db user=u dbname=x", "host=db user=u dbname=x"),  # no password: unchanged
        (
            "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dt_1",
            "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dt_1",
        ),
    ],
)
def test_redact_url_hides_whole_passwords(text, redacted):
    assert redact_url(text) == redacted
    assert redact_url(redact_url(text)) == redacted  # idempotent


# -- variable_holds: which values the Dagster resources name instead of holding -------------
def test_variable_holds_only_the_value_the_environment_gives(monkeypatch):
    from esper_assets.settings import variable_holds

    monkeypatch.setenv("ESPER_REDIS_URL", "  redis://cache:6379/0 ")  # read stripped
    assert variable_holds("ESPER_REDIS_URL", "redis://cache:6379/0")
    assert not variable_holds("ESPER_REDIS_URL", "redis://other:6379/0")
    assert not variable_holds("ESPER_REDIS_URL", None)
    monkeypatch.delenv("ESPER_REDIS_URL")
    assert not variable_holds("ESPER_REDIS_URL", "")


# -- ESPER_REQUIRE_SERVICES: a cluster's machines refuse the local fallback ---------------------
CLUSTER_SERVICES = {
    "ESPER_DATABASE_URL": f"postgresql://esper:{PASSWORD}@db.internal:5432/esper",
    "ESPER_S3_BUCKET": "esper-kernels",
    "ESPER_LANDING": "s3://esper-landing/incoming",
}
REQUIRED = ("ESPER_DATABASE_URL", "ESPER_S3_BUCKET", "ESPER_LANDING")


@pytest.mark.parametrize("on", ["1", "true", "yes", "on", "TRUE", " On "])
def test_required_services_missing_name_every_variable_and_what_to_do(tmp_path, on):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_REQUIRE_SERVICES=on)
    message = str(info.value)
    assert all(name in message for name in REQUIRED)
    assert "s3://" in message  # the landing zone must be in S3, not just set
    assert "unset ESPER_REQUIRE_SERVICES" in message


@pytest.mark.parametrize("missing", REQUIRED)
def test_required_services_name_only_what_is_missing(tmp_path, missing):
    env = {k: v for k, v in CLUSTER_SERVICES.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_REQUIRE_SERVICES="1", **env)
    message = str(info.value)
    assert [name for name in REQUIRED if name in message] == [missing]
    assert PASSWORD not in message


def test_required_services_refuse_a_local_landing_directory(tmp_path):
    env = CLUSTER_SERVICES | {"ESPER_LANDING": str(tmp_path / "landing")}
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_REQUIRE_SERVICES="yes", **env)
    message = str(info.value)
    assert "ESPER_LANDING" in message and str(tmp_path / "landing") in message
    assert "s3://" in message


def test_required_services_all_set_give_the_cluster_settings(tmp_path):
    s = settings_with(tmp_path, ESPER_REQUIRE_SERVICES="1", **CLUSTER_SERVICES)
    assert s.uses_postgres
    assert s.s3_bucket == "esper-kernels"
    assert s.landing == "s3://esper-landing/incoming"
    assert s.redis_url is None  # L2 stays optional


@pytest.mark.parametrize("off", ["0", "false", "no", "off", "OFF", "", "  "])
def test_required_services_off_or_unset_keep_the_embedded_default(tmp_path, off):
    s = settings_with(tmp_path, ESPER_REQUIRE_SERVICES=off)
    assert s.database_url is None and s.s3_bucket is None
    assert s.landing == str(tmp_path.resolve() / "landing")


@pytest.mark.parametrize("bad", ["2", "y", "enabled", "true!", "-1"])
def test_required_services_bad_value_is_a_config_error(tmp_path, bad):
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, ESPER_REQUIRE_SERVICES=bad, **CLUSTER_SERVICES)
    message = str(info.value)
    assert "ESPER_REQUIRE_SERVICES" in message and repr(bad) in message
    assert "1/true/yes/on" in message and "0/false/no/off" in message


def test_require_services_is_a_service_variable():
    # Fixtures and subprocess tests that want the embedded default unset every one of
    # these; a developer's exported ESPER_REQUIRE_SERVICES=1 must not leak into them.
    from esper_assets.settings import SERVICE_VARIABLES

    assert "ESPER_REQUIRE_SERVICES" in SERVICE_VARIABLES


# -- esper serve's metrics directory ----------------------------------------------------------
def test_metrics_dir_is_the_operators_prometheus_multiproc_dir(tmp_path):
    given = tmp_path / "metrics"
    assert settings_with(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(given)).metrics_dir == given
    assert settings_with(tmp_path, PROMETHEUS_MULTIPROC_DIR=" ").metrics_dir is None  # blank
    assert settings_with(tmp_path).metrics_dir is None  # esper serve makes one per run
