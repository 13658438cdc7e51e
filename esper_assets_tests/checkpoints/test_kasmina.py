"""mapped_kernels: the kernel ids of the ``kasmina`` component's kernel mappings, from
JSON bytes, a ``.json`` file or a ``.safetensors`` header; nothing from opaque state;
malformed mappings refused naming the component and the field; reads bounded. Then
one end-to-end save whose manifest lists them (skipped until the store is wired)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from esper_assets.checkpoints.kasmina import KASMINA, MAX_JSON_BYTES, mapped_kernels
from esper_assets.checkpoints.safetensors import encode_header
from esper_assets.errors import InvalidCheckpoint, InvalidInput
from esper_assets_tests.checkpoints.conftest import weights

SEEDS = {"seed-3": "k-conv-b", "seed-1": "k-attn-a", "seed-2": "k-conv-b"}
EXPECTED = ["k-attn-a", "k-conv-b"]  # sorted, unique


def document(mappings: object, **extra: object) -> bytes:
    return json.dumps({"kernel_mappings": mappings, **extra}).encode()


def safetensors_file(path, metadata: dict[str, str] | None) -> str:
    arrays = {"alpha": np.arange(4, dtype=np.float32)}
    header, laid_out = encode_header(arrays, metadata)
    path.write_bytes(header + b"".join(a.tobytes() for a in laid_out))
    return str(path)


def padded_to(data: bytes, size: int) -> bytes:
    """The same JSON document, exactly ``size`` bytes long (trailing whitespace)."""
    return data + b" " * (size - len(data))


# -- where the mappings come from ----------------------------------------------------------
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_json_bytes_of_every_kind(wrap):
    assert mapped_kernels({KASMINA: wrap(document(SEEDS))}) == EXPECTED


def test_a_list_of_kernel_ids():
    assert mapped_kernels({KASMINA: document(["k-b", "k-a", "k-b"])}) == ["k-a", "k-b"]
    assert mapped_kernels({KASMINA: document([])}) == []
    assert mapped_kernels({KASMINA: document({})}) == []


def test_other_fields_of_the_document_are_ignored():
    data = document(SEEDS, alpha=[0.1, 0.2], seeds={"seed-1": {"state": "grafted"}})
    assert mapped_kernels({"model": b"weights", KASMINA: data}) == EXPECTED


def test_a_json_file_as_str_or_path(tmp_path):
    path = tmp_path / "kasmina.json"
    path.write_bytes(document(SEEDS))
    assert mapped_kernels({KASMINA: str(path)}) == EXPECTED
    assert mapped_kernels({KASMINA: path}) == EXPECTED


@pytest.mark.parametrize("mappings", [SEEDS, list(SEEDS.values())])
def test_safetensors_metadata(tmp_path, mappings):
    path = safetensors_file(tmp_path / "kasmina.safetensors",
                            {"kernel_mappings": json.dumps(mappings), "other": "x"})  # fmt: skip
    assert mapped_kernels({KASMINA: path}) == EXPECTED


def test_safetensors_without_mappings(tmp_path):
    assert mapped_kernels({KASMINA: safetensors_file(tmp_path / "a.safetensors", None)}) == []
    other = safetensors_file(tmp_path / "b.safetensors", {"format": "pt"})
    assert mapped_kernels({KASMINA: other}) == []


# -- nothing to find -------------------------------------------------------------------------
def test_no_kasmina_component_finds_nothing():
    assert mapped_kernels({"model": document(SEEDS)}) == []  # only kasmina is read
    assert mapped_kernels({}) == []


@pytest.mark.parametrize(
    "value",
    [
        os.urandom(4096),  # opaque binary state
        b"\x80\x04\x95 a pickle",
        b"",
        b"[1, 2, 3]",  # JSON, not an object
        b'"kernel_mappings"',
        json.dumps({"seeds": SEEDS}).encode(),  # an object without the field
        b'{"kernel_mappings": [' + b"[" * 200_000,  # too deep for the parser: not JSON to us
    ],
    ids=["random", "pickle", "empty", "list", "string", "no-field", "too-deep"],
)
def test_opaque_state_finds_nothing(value):
    assert mapped_kernels({KASMINA: value}) == []


def test_arrays_and_other_files_find_nothing(tmp_path):
    assert mapped_kernels({KASMINA: weights(2, 8)}) == []
    other = tmp_path / "kasmina.bin"  # JSON inside, but not a kind we read
    other.write_bytes(document(SEEDS))
    assert mapped_kernels({KASMINA: str(other)}) == []


# -- bounded reads ----------------------------------------------------------------------------
def test_json_over_the_bound_is_not_parsed(tmp_path):
    at_bound = padded_to(document(SEEDS), MAX_JSON_BYTES)
    over = padded_to(document(SEEDS), MAX_JSON_BYTES + 1)
    assert mapped_kernels({KASMINA: at_bound}) == EXPECTED
    assert mapped_kernels({KASMINA: over}) == []
    path = tmp_path / "kasmina.json"
    path.write_bytes(at_bound)
    assert mapped_kernels({KASMINA: path}) == EXPECTED
    path.write_bytes(over)
    assert mapped_kernels({KASMINA: path}) == []


# -- refused ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mappings", "where"),
    [
        ("k-a", "kernel_mappings"),
        (7, "kernel_mappings"),
        (None, "kernel_mappings"),
        ({"seed-1": 3}, "kernel_mappings['seed-1']"),
        ({"seed-1": None}, "kernel_mappings['seed-1']"),
        ({"seed-1": ["k-a"]}, "kernel_mappings['seed-1']"),
        ({"seed-1": ""}, "kernel_mappings['seed-1']"),
        (["k-a", True], "kernel_mappings[1]"),
        (["k-a", "a/b"], "kernel_mappings[1]"),
        (["x" * 129], "kernel_mappings[0]"),
    ],
)
def test_malformed_mappings_are_refused(mappings, where):
    with pytest.raises(InvalidInput) as caught:
        mapped_kernels({KASMINA: document(mappings)})
    assert "'kasmina'" in str(caught.value) and where in str(caught.value)


def test_malformed_safetensors_mappings_are_refused(tmp_path):
    not_json = safetensors_file(tmp_path / "a.safetensors", {"kernel_mappings": "seed-1=k-a"})
    with pytest.raises(InvalidInput, match=r"'kasmina'.*kernel_mappings.* is not JSON"):
        mapped_kernels({KASMINA: not_json})
    a_string = safetensors_file(tmp_path / "b.safetensors", {"kernel_mappings": '"k-a"'})
    with pytest.raises(InvalidInput, match=r"'kasmina'.*'kernel_mappings' must be an object"):
        mapped_kernels({KASMINA: a_string})


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(InvalidCheckpoint, match=r"'kasmina'.*cannot read .*missing\.json"):
        mapped_kernels({KASMINA: tmp_path / "missing.json"})
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InvalidCheckpoint, match="not a regular file"):
        mapped_kernels({KASMINA: tmp_path / "dir.json"})
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(b"\x10\x00")
    with pytest.raises(InvalidCheckpoint, match="truncated safetensors"):
        mapped_kernels({KASMINA: truncated})
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidCheckpoint, match="header claims"):
        mapped_kernels({KASMINA: lying})


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["save", "save_async"])
def test_a_save_lists_the_mapped_kernels_with_the_given_ones(checkpoints, how):
    components = {"model": weights(2, 16), KASMINA: document(SEEDS)}
    if how == "save":
        info = checkpoints.save("r", 1, components, kernels=["k-given"])
    else:
        info = checkpoints.save_async("r", 1, components, kernels=["k-given"]).result()
    union = sorted(["k-given", *EXPECTED])
    assert list(info.kernels) == union
    assert checkpoints.show("r", 1)["kernels"] == union
    assert checkpoints.list("r")[0]["kernels"] == union
