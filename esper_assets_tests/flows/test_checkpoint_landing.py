"""Checkpoint folders landed in a directory or under an S3 prefix (moto's HTTP
server): the same folders get the same decisions, marks and reasons on both. A
folder without ``manifest.json`` waits; a complete one is saved once and marked
``.esper-ingested``; a bad one gets ``.esper-rejected.txt`` with the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esper_assets.flows import wiring
from esper_assets.flows.checkpoints import INGESTED_MARK, REJECTED_MARK, ingest_landed
from esper_assets.flows.landing import (
    DirectoryCheckpoints,
    S3Checkpoints,
    checkpoint_folders,
)
from esper_assets.settings import Settings
from esper_assets.storage.objects import make_s3_client


class Dropzone:
    """Puts and reads files under ``<landing>/checkpoints/`` the way a producer and an
    operator would, beside the adapter under test (``folders``)."""

    def __init__(self, folders, put, get) -> None:
        self.folders, self.put, self.get = folders, put, get

    def land(self, run: str, step: str, manifest: object, files: dict[str, bytes]) -> str:
        folder = f"{run}/{step}"
        for name, data in files.items():
            self.put(f"{folder}/{name}", data)
        if manifest is not None:  # written last, as a producer must
            text = manifest if isinstance(manifest, str) else json.dumps(manifest)
            self.put(f"{folder}/manifest.json", text.encode())
        return folder

    def mark(self, folder: str, mark: str) -> str | None:
        data = self.get(f"{folder}/{mark}")
        return None if data is None else data.decode()


@pytest.fixture(params=["directory", "s3"])
def landing(request, tmp_path: Path) -> Dropzone:
    if request.param == "directory":
        root = tmp_path / "landing" / "checkpoints"

        def put(key: str, data: bytes) -> None:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)

        def get(key: str) -> bytes | None:
            return (root / key).read_bytes() if (root / key).exists() else None

        return Dropzone(DirectoryCheckpoints(tmp_path / "landing"), put, get)
    bucket = request.getfixturevalue("s3_bucket")
    client = make_s3_client(request.getfixturevalue("s3_endpoint"))
    prefix = "drop/checkpoints/"

    def put_object(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=prefix + key, Body=data)

    def get_object(key: str) -> bytes | None:
        try:
            return client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    return Dropzone(S3Checkpoints(client, bucket, "drop"), put_object, get_object)


@pytest.fixture
def store(esper_home):
    with wiring.open_checkpoints(Settings.from_env()) as store:
        yield store


def test_a_complete_folder_is_saved_once_and_restores_to_its_files(landing, store, tmp_path):
    weights = os.urandom(3 << 20)  # larger than the copy buffer: streamed in pieces
    folder = landing.land("ext", "5", {"components": {"model": "m.bin", "opt": "o.bin"},
                                       "kernels": [], "metrics": {"loss": 0.25}},
                          {"m.bin": weights, "o.bin": b"adam" * 100})  # fmt: skip
    (landed,) = ingest_landed(store, landing.folders)
    assert (landed.asset_id, landed.error) == ("checkpoint:ext:5", "")
    assert landed.location == landing.folders.where(folder)
    assert landing.mark(folder, INGESTED_MARK) == "checkpoint:ext:5\n"
    assert ingest_landed(store, landing.folders) == []  # listed again: not ingested twice
    assert [(row["step"], row["metrics"]) for row in store.list("ext")] == [(5, {"loss": 0.25})]
    report = store.restore("ext", 5, dest=tmp_path / "out")
    restored = {p.parent.name: p.read_bytes() for p in (tmp_path / "out").rglob("*")
                if p.is_file()}  # fmt: skip
    assert len(report.files) == 2 and restored == {"model": weights, "opt": b"adam" * 100}


def test_a_folder_without_its_manifest_waits_until_it_arrives(landing, store):
    folder = landing.land("late", "1", None, {"m.bin": b"half written"})
    assert ingest_landed(store, landing.folders) == []
    assert landing.mark(folder, INGESTED_MARK) is None
    assert landing.mark(folder, REJECTED_MARK) is None
    landing.land("late", "1", {"components": {"model": "m.bin"}}, {})
    (landed,) = ingest_landed(store, landing.folders)
    assert landed.asset_id == "checkpoint:late:1"


@pytest.mark.parametrize(
    ("step", "manifest", "files", "reason"),
    [
        ("1", "{", {}, "late/1: manifest.json is not readable JSON"),
        ("2", "[1, 2]", {}, "late/2: manifest.json must be an object"),
        ("3", {"components": {"model": "gone.bin"}}, {"m.bin": b"x"},
         "late/3: component 'model' names 'gone.bin', which is not a file here"),
        ("4", {"models": {"model": "m.bin"}}, {"m.bin": b"x"},
         "late/4: manifest.json needs 'components'"),
        ("5", {"components": {"model": "m.bin"}, "metrics": [1]}, {"m.bin": b"x"},
         "late/5: manifest.json 'metrics' must be an object"),
        ("x1", {"components": {"model": "m.bin"}}, {"m.bin": b"x"},
         "late/x1: expected <run>/<step> with step a number"),
    ],
)  # fmt: skip
def test_a_bad_folder_is_rejected_once_with_its_reason(landing, store, step, manifest, files,
                                                       reason):  # fmt: skip
    folder = landing.land("late", step, manifest, files)
    (landed,) = ingest_landed(store, landing.folders)
    assert landed.asset_id == "" and landed.error.startswith(reason)
    assert landing.mark(folder, REJECTED_MARK) == landed.error + "\n"
    assert landing.mark(folder, INGESTED_MARK) is None
    assert ingest_landed(store, landing.folders) == []  # not tried again
    assert store.list("late") == []


def test_two_components_may_share_one_file(landing, store):
    manifest = {"components": {"model": "w.bin", "ema": "w.bin"}}
    landing.land("twin", "0", manifest, {"w.bin": b"shared" * 100})
    (landed,) = ingest_landed(store, landing.folders)
    assert landed.error == ""
    assert sorted(store.show("twin", 0)["components"]) == ["ema", "model"]


def test_a_step_saved_already_is_rejected_saying_so(landing, store):
    store.save("dup", 0, {"model": b"original"})
    folder = landing.land("dup", "0", {"components": {"model": "m.bin"}}, {"m.bin": b"other"})
    (landed,) = ingest_landed(store, landing.folders)
    assert "already saved; not ingested again" in landed.error
    assert "already saved" in landing.mark(folder, REJECTED_MARK)


def test_good_folders_are_saved_beside_bad_ones_in_step_order(landing, store):
    landing.land("mix", "10", {"components": {"model": "m.bin"}}, {"m.bin": b"ten" * 50})
    landing.land("mix", "9", {"components": {"model": "m.bin"}}, {"m.bin": b"nine" * 50})
    landing.land("mix", "11", "not json", {})
    outcomes = ingest_landed(store, landing.folders)
    assert [(o.asset_id, bool(o.error)) for o in outcomes] == [
        ("checkpoint:mix:9", False), ("checkpoint:mix:10", False), ("", True),
    ]  # fmt: skip
    parents = {row["step"]: row["parent_id"] for row in store.list("mix")}
    assert parents == {9: None, 10: "checkpoint:mix:9"}


def test_the_landing_location_picks_the_adapter(tmp_path, s3_bucket, s3_endpoint):
    client = make_s3_client(s3_endpoint)
    on_s3 = checkpoint_folders(f"s3://{s3_bucket}/in", client)
    assert isinstance(on_s3, S3Checkpoints)
    assert on_s3.location == f"s3://{s3_bucket}/in/checkpoints/"
    on_disk = checkpoint_folders(str(tmp_path))
    assert isinstance(on_disk, DirectoryCheckpoints) and on_disk.folders() == {}
