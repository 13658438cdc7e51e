"""The landing zone (a directory, and S3 through moto's HTTP server) and the
new_blueprints sensor's scan logic: cursor, rejections, parents first."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from esper_assets.flows.arrivals import MAX_WAITS, Cursor, file_name_problem, scan_landing
from esper_assets.flows.landing import DirectoryLanding, S3Landing, landing_from_location


def blueprint(
    name: str, parent: str | None = None, width: int = 8, version: str = "1.0.0"
) -> bytes:
    doc = {
        "name": name,
        "version": version,
        "input_shape": [4],
        "layers": [{"op": "linear", "out_features": width}, {"op": "relu"}],
    }
    if parent:
        doc["parent"] = parent
    return json.dumps(doc).encode()


class CountingLanding(DirectoryLanding):
    """A real directory landing that counts file reads (to show a tick reads only new files)."""

    reads = 0

    def read(self, key: str) -> bytes:
        self.reads += 1
        return super().read(key)


def never_registered(name: str, version: str) -> bool:
    return False


@pytest.fixture(params=["directory", "s3"])
def landing(request, tmp_path):
    if request.param == "directory":
        return DirectoryLanding(tmp_path / "landing")
    s3_bucket = request.getfixturevalue("s3_bucket")
    from esper_assets.storage.objects import make_s3_client

    client = make_s3_client(request.getfixturevalue("s3_endpoint"))
    return S3Landing(client, s3_bucket, "landing")


def test_landing_lists_puts_reads_and_rejects_without_deleting(landing):
    landing.put("a.json", blueprint("a"))
    landing.put("b.yaml", b"name: b\n")
    files = {f.key: f for f in landing.list_blueprints()}
    assert set(files) == {"a.json", "b.yaml"}
    assert files["b.yaml"].size == len(b"name: b\n")
    assert landing.read("a.json") == blueprint("a")
    moved_to = landing.reject("b.yaml", "bad name")
    assert "rejected" in moved_to
    assert {f.key for f in landing.list_blueprints()} == {"a.json"}  # rejected/ is not listed
    if isinstance(landing, DirectoryLanding):
        rejected = landing.folder / "rejected"
        assert (rejected / "b.yaml").read_bytes() == b"name: b\n"
        assert (rejected / "b.yaml.error.txt").read_text() == "bad name\n"
    else:
        body = landing.client.get_object(
            Bucket=landing.bucket, Key=landing.folder + "rejected/b.yaml"
        )
        assert body["Body"].read() == b"name: b\n"
        reason = landing.client.get_object(
            Bucket=landing.bucket, Key=landing.folder + "rejected/b.yaml.error.txt"
        )
        assert reason["Body"].read() == b"bad name\n"


def test_landing_location_picks_the_implementation(tmp_path, s3_endpoint, s3_bucket):
    from esper_assets.storage.objects import make_s3_client

    assert isinstance(landing_from_location(str(tmp_path)), DirectoryLanding)
    s3 = landing_from_location(f"s3://{s3_bucket}/in", make_s3_client(s3_endpoint))
    assert isinstance(s3, S3Landing) and s3.location == f"s3://{s3_bucket}/in/blueprints/"


def test_an_s3_landing_zone_needs_the_client_the_settings_configure():
    """landing reads no environment: without a client it says where to get one."""
    from esper_assets.errors import ConfigError

    with pytest.raises(ConfigError, match=r"wiring\.landing_zone"):
        landing_from_location("s3://some-bucket/in")


def test_a_file_moved_in_with_an_old_mtime_still_counts_as_new(tmp_path):
    import os

    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("a.json", blueprint("a"))
    first = scan_landing(landing, Cursor(), never_registered)
    outside = tmp_path / "b.json"
    outside.write_bytes(blueprint("b"))
    os.utime(outside, ns=(1, 1))  # written long ago, e.g. `cp -p` or `mv` from elsewhere
    os.replace(outside, landing.folder / "b.json")
    second = scan_landing(landing, first.cursor, never_registered)
    assert [a.name for a in second.arrivals] == ["b"]


def test_scan_requests_each_new_file_once_and_again_when_it_changes(landing):
    landing.put("a.json", blueprint("a"))
    landing.put("b.json", blueprint("b"))
    first = scan_landing(landing, Cursor(), never_registered)
    assert sorted(a.name for a in first.arrivals) == ["a", "b"]
    again = scan_landing(landing, Cursor.load(first.cursor.dump()), never_registered)
    assert again.arrivals == []
    # At once: on S3 (1 s stamps), and often on a directory, in the same stamp as the first.
    landing.put("a.json", blueprint("a", width=16))
    changed = scan_landing(landing, again.cursor, never_registered)
    assert [a.name for a in changed.arrivals] == ["a"]
    old_key = next(a.run_key for a in first.arrivals if a.name == "a")
    assert changed.arrivals[0].run_key != old_key  # new content, new run key


def test_unchanged_content_rewritten_keeps_its_run_key(tmp_path):
    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("a.json", blueprint("a"))
    first = scan_landing(landing, Cursor(), never_registered)
    landing.put("a.json", blueprint("a"))  # touched, same bytes
    second = scan_landing(landing, first.cursor, never_registered)
    assert [a.run_key for a in second.arrivals] == [a.run_key for a in first.arrivals]


@pytest.mark.parametrize(
    "key",
    ["has space.yaml", "Upper.yaml", ("x" * 200) + ".yaml", "notes.txt", "-dash.json", "a.b.yaml"],
)
def test_unusable_file_names_are_moved_to_rejected_with_a_reason(tmp_path, key):
    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("good.json", blueprint("good"))
    landing.put(key, b"{}")
    scan = scan_landing(landing, Cursor(), never_registered)
    assert [a.name for a in scan.arrivals] == ["good"]  # the good file is unaffected
    assert [r[0] for r in scan.rejected] == [key]
    assert key in scan.rejected[0][1]
    assert (landing.folder / "rejected" / key).read_bytes() == b"{}"  # moved, not deleted
    assert (landing.folder / "rejected" / f"{key}.error.txt").read_text().strip()
    assert file_name_problem(key) is not None


def test_s3_keys_that_cannot_be_partitions_are_rejected(s3_endpoint, s3_bucket):
    from esper_assets.storage.objects import make_s3_client

    client = make_s3_client(s3_endpoint)
    landing = S3Landing(client, s3_bucket, "landing")
    landing.put("good.json", blueprint("good"))
    client.put_object(Bucket=s3_bucket, Key="landing/blueprints/with space.json", Body=b"{}")
    scan = scan_landing(landing, Cursor(), never_registered)
    assert [a.name for a in scan.arrivals] == ["good"]
    assert [r[0] for r in scan.rejected] == ["with space.json"]
    kept = client.get_object(Bucket=s3_bucket, Key="landing/blueprints/rejected/with space.json")
    assert kept["Body"].read() == b"{}"


def test_a_child_waits_for_a_parent_landing_in_the_same_batch(tmp_path):
    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("base.json", blueprint("base"))
    landing.put("child.json", blueprint("child", parent="base@1.0.0"))
    registered: set[tuple[str, str]] = set()
    first = scan_landing(landing, Cursor(), lambda n, v: (n, v) in registered)
    assert [a.name for a in first.arrivals] == ["base"]
    assert first.waiting == ["child.json"]
    second = scan_landing(landing, first.cursor, lambda n, v: (n, v) in registered)
    assert second.waiting == ["child.json"]  # parent still not registered: keep waiting
    registered.add(("base", "1.0.0"))
    third = scan_landing(landing, second.cursor, lambda n, v: (n, v) in registered)
    assert [a.name for a in third.arrivals] == ["child"] and third.waiting == []


def test_a_child_stops_waiting_after_max_waits(tmp_path):
    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("base.json", b"not json")  # the parent will never register
    landing.put("child.json", blueprint("child", parent="base@1.0.0"))
    cursor = Cursor()
    released = []
    for _ in range(MAX_WAITS + 2):
        scan = scan_landing(landing, cursor, never_registered)
        released += [a.name for a in scan.arrivals if a.name == "child"]
        cursor = scan.cursor
        landing.put("base.json", b"not json either" + bytes([len(released)]))
    assert released == ["child"]  # its run goes ahead once, and fails naming the parent


def test_a_child_whose_parent_is_nowhere_does_not_wait(tmp_path):
    landing = DirectoryLanding(tmp_path / "landing")
    landing.put("child.json", blueprint("child", parent="base@1.0.0"))
    scan = scan_landing(landing, Cursor(), never_registered)
    assert [a.name for a in scan.arrivals] == ["child"]  # the run will say what is missing


def test_a_tick_reads_only_new_files_and_the_cursor_stays_small(tmp_path):
    landing = CountingLanding(tmp_path / "landing")
    for i in range(300):
        landing.put(f"bp{i}.json", blueprint(f"bp{i}"))
    first = scan_landing(landing, Cursor(), never_registered)
    assert len(first.arrivals) == 300 and landing.reads == 300
    landing.reads = 0
    idle = scan_landing(landing, first.cursor, never_registered)
    assert idle.arrivals == [] and landing.reads == 0
    for i in range(5):
        landing.put(f"new{i}.json", blueprint(f"new{i}"))
    busy = scan_landing(landing, idle.cursor, never_registered)
    assert len(busy.arrivals) == 5 and landing.reads == 5
    assert len(busy.cursor.dump()) < 300  # a high-water mark, not a list of 305 files


def test_an_unreadable_cursor_means_look_at_everything_again():
    assert Cursor.load("{not json") == Cursor()
    assert Cursor.load(None) == Cursor()
    cursor = Cursor(5, {"a.json": "3f2a9c01d4e5"}, {"b.json": 2})
    assert Cursor.load(cursor.dump()) == cursor


class CoarseClockLanding(DirectoryLanding):
    """A real directory on a file system whose clock never moves (FAT, some network
    mounts, or simply two writes within one timestamp tick): every file has stamp 1."""

    def list_blueprints(self):
        return [replace(f, changed_ns=1) for f in super().list_blueprints()]


def test_new_content_with_the_same_stamp_is_seen_on_a_directory(tmp_path):
    landing = CoarseClockLanding(tmp_path / "landing")
    landing.put("a.json", blueprint("a"))
    first = scan_landing(landing, Cursor(), never_registered)
    assert [a.name for a in first.arrivals] == ["a"]
    idle = scan_landing(landing, Cursor.load(first.cursor.dump()), never_registered)
    assert idle.arrivals == []  # unchanged: not read again
    landing.put("a.json", blueprint("a", width=16))
    changed = scan_landing(landing, Cursor.load(idle.cursor.dump()), never_registered)
    assert [a.name for a in changed.arrivals] == ["a"]
    assert changed.arrivals[0].run_key != first.arrivals[0].run_key


def test_s3_new_content_uploaded_in_the_same_second_is_seen(s3_endpoint, s3_bucket):
    """S3's LastModified has 1 s resolution: a re-upload right after a tick can carry
    the very stamp the cursor stopped at. Retried until that really happens (a
    second boundary may fall between the two uploads)."""
    from esper_assets.storage.objects import make_s3_client

    client = make_s3_client(s3_endpoint)
    for attempt in range(10):
        landing = S3Landing(client, s3_bucket, f"same-second-{attempt}")
        landing.put("a.json", blueprint("a"))
        first = scan_landing(landing, Cursor(), never_registered)
        landing.put("a.json", blueprint("a", width=16))
        [listed] = landing.list_blueprints()
        if listed.changed_ns == first.cursor.stamp:
            break
    else:
        pytest.fail("no re-upload landed in the same second as the first in 10 attempts")
    changed = scan_landing(landing, Cursor.load(first.cursor.dump()), never_registered)
    assert [a.name for a in changed.arrivals] == ["a"]  # seen, though its stamp did not move
    assert changed.arrivals[0].run_key != first.arrivals[0].run_key
    idle = scan_landing(landing, Cursor.load(changed.cursor.dump()), never_registered)
    assert idle.arrivals == []  # and only once


def test_a_cursor_written_before_file_versions_is_still_loadable(tmp_path):
    landing = CoarseClockLanding(tmp_path / "landing")
    landing.put("a.json", blueprint("a"))
    landing.put("b.json", blueprint("b"))
    old = json.dumps({"stamp": 1, "at": ["a.json", "b.json"], "wait": {}})  # keys only
    cursor = Cursor.load(old)
    assert cursor.stamp == 1 and cursor.at_stamp == {}  # versions unknown
    scan = scan_landing(landing, cursor, never_registered)
    # Files at the old stamp are looked at again; their runs dedupe by run key.
    assert sorted(a.name for a in scan.arrivals) == ["a", "b"]
    assert scan_landing(landing, scan.cursor, never_registered).arrivals == []
