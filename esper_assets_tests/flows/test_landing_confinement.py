"""The directory landing zone writes, moves and reads only inside itself.

Every test plants a real symlink inside the landing zone that points at a file or
folder outside it, and checks that the outside is left exactly as it was and that
the refusal names the path and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper_assets.errors import EsperError, InvalidInput, StorageError
from esper_assets.flows.arrivals import Cursor, scan_landing
from esper_assets.flows.landing import DirectoryLanding

PRECIOUS = b"outside the landing zone: must never change\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the landing zone holding one file nobody may touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_bytes(PRECIOUS)
    return folder


@pytest.fixture
def landing(tmp_path: Path) -> DirectoryLanding:
    return DirectoryLanding(tmp_path / "landing")


def outside_is_untouched(outside: Path) -> bool:
    return (
        sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
        and (outside / "precious.txt").read_bytes() == PRECIOUS
    )


def test_reject_refuses_an_error_file_that_is_a_symlink(landing, outside):
    landing.put("notes.txt", b"not a blueprint")
    rejected = landing.folder / "rejected"
    rejected.mkdir()
    planted = rejected / "notes.txt.error.txt"
    planted.symlink_to(outside / "precious.txt")
    with pytest.raises(StorageError) as caught:
        landing.reject("notes.txt", "not a blueprint file")
    message = str(caught.value)
    assert str(planted) in message and "symlink" in message and "remove" in message
    assert outside_is_untouched(outside)
    assert (landing.folder / "notes.txt").read_bytes() == b"not a blueprint"  # not moved
    assert planted.is_symlink()  # refused, not silently replaced


def test_reject_refuses_a_moved_file_target_that_is_a_symlink(landing, outside):
    landing.put("notes.txt", b"not a blueprint")
    rejected = landing.folder / "rejected"
    rejected.mkdir()
    planted = rejected / "notes.txt"
    planted.symlink_to(outside / "precious.txt")
    with pytest.raises(StorageError, match="symlink"):
        landing.reject("notes.txt", "not a blueprint file")
    assert outside_is_untouched(outside)
    assert (landing.folder / "notes.txt").read_bytes() == b"not a blueprint"


def test_reject_refuses_a_rejected_folder_that_is_a_symlink(landing, outside):
    landing.put("notes.txt", b"not a blueprint")
    planted = landing.folder / "rejected"
    planted.symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError) as caught:
        landing.reject("notes.txt", "not a blueprint file")
    message = str(caught.value)
    assert str(planted) in message and "symlink" in message and "mkdir" in message
    assert outside_is_untouched(outside)  # nothing moved out, no .error.txt written out there
    assert (landing.folder / "notes.txt").read_bytes() == b"not a blueprint"


def test_the_sensor_scan_reports_a_refused_rejection_and_goes_on(landing, outside):
    landing.put("good.json", b'{"name": "good"}')
    landing.put("notes.txt", b"not a blueprint")
    (landing.folder / "rejected").symlink_to(outside, target_is_directory=True)
    scan = scan_landing(landing, Cursor(), lambda name, version: False)
    assert [a.name for a in scan.arrivals] == ["good"]
    [(key, _reason, moved_to)] = scan.rejected
    assert key == "notes.txt" and moved_to.startswith("(not moved:") and "symlink" in moved_to
    assert outside_is_untouched(outside)


def test_put_never_writes_through_a_planted_temporary_file(landing, outside):
    # The old temporary name was predictable: .<key>.tmp
    (landing.folder / ".a.json.tmp").symlink_to(outside / "precious.txt")
    landing.put("a.json", b'{"name": "a"}')
    assert outside_is_untouched(outside)
    target = landing.folder / "a.json"
    assert not target.is_symlink() and target.read_bytes() == b'{"name": "a"}'
    assert [f.key for f in landing.list_blueprints()] == ["a.json"]


def test_put_replaces_a_symlinked_blueprint_without_following_it(landing, outside):
    (landing.folder / "a.json").symlink_to(outside / "precious.txt")
    landing.put("a.json", b'{"name": "a"}')
    assert outside_is_untouched(outside)
    target = landing.folder / "a.json"
    assert not target.is_symlink() and target.read_bytes() == b'{"name": "a"}'


def test_read_refuses_a_symlinked_blueprint(landing, outside):
    planted = landing.folder / "a.json"
    planted.symlink_to(outside / "precious.txt")
    assert landing.list_blueprints() == []  # the listing already skips it
    with pytest.raises(InvalidInput) as caught:
        landing.read("a.json")
    message = str(caught.value)
    assert str(planted) in message and "symlink" in message and "copy" in message


def test_a_blueprints_folder_that_is_a_symlink_is_refused(tmp_path, outside):
    root = tmp_path / "landing"
    root.mkdir()
    (root / "blueprints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError) as caught:
        DirectoryLanding(root)
    message = str(caught.value)
    assert str(root / "blueprints") in message and "symlink" in message
    assert "ESPER_LANDING" in message
    assert outside_is_untouched(outside)


def test_a_landing_root_reached_through_a_symlink_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    landing = DirectoryLanding(tmp_path / "link")  # ESPER_LANDING may itself be a link
    landing.put("a.json", b"{}")
    landing.put("x.txt", b"no")
    landing.reject("x.txt", "bad name")
    assert (real / "blueprints" / "rejected" / "x.txt.error.txt").read_text() == "bad name\n"
    assert [f.key for f in landing.list_blueprints()] == ["a.json"]


def test_rejecting_twice_replaces_the_earlier_reason(landing):
    for reason in ("first reason", "second reason"):
        landing.put("x.txt", reason.encode())
        landing.reject("x.txt", reason)
    rejected = landing.folder / "rejected"
    assert (rejected / "x.txt.error.txt").read_text() == "second reason\n"
    assert (rejected / "x.txt").read_bytes() == b"second reason"
    assert sorted(p.name for p in rejected.iterdir()) == ["x.txt", "x.txt.error.txt"]


def test_landing_errors_are_esper_errors(landing):
    with pytest.raises(EsperError, match="gone"):
        landing.read("missing.json")
    with pytest.raises(InvalidInput, match="plain file name"):
        landing.reject("../escape.txt", "no")
    os.mkdir(landing.folder / "a.json")  # a folder where a file was expected
    with pytest.raises(InvalidInput, match="not a regular file"):
        landing.read("a.json")
