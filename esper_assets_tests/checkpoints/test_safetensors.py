"""The safetensors header parser and writer: real files from the ``safetensors``
package parse, and every kind of lying header is refused with InvalidCheckpoint."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load, save

from esper_assets.checkpoints.safetensors import encode_header, parse_header
from esper_assets.errors import InvalidCheckpoint
from esper_assets_tests.checkpoints.conftest import safetensors_bytes


def test_a_file_written_by_the_safetensors_package_parses():
    arrays = {"b": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.ones(4, np.float16)}
    data = save(arrays, metadata={"format": "np"})
    layout = parse_header(data, len(data), "t")
    assert layout.metadata == {"format": "np"}
    spans = {t.name: t for t in layout.tensors}
    assert spans["b"].dtype == "I64" and spans["b"].shape == (2, 3)
    assert data[spans["a"].start : spans["a"].end] == arrays["a"].tobytes()


def test_what_we_write_is_read_by_the_safetensors_package():
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "flag": np.array([True])}
    header, laid_out = encode_header(arrays)
    data = header + b"".join(a.tobytes() for a in laid_out)
    loaded = load(data)
    assert set(loaded) == {"w", "flag"}
    np.testing.assert_array_equal(loaded["w"], arrays["w"])


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "complaint"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, "span 16"),
        ({"x": F32x2}, b"\0" * 4, "past the end"),
        ({"x": F32x2}, b"\0" * 12, "short of"),
        ({"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
         b"\0" * 12, "overlaps"),
        ({"x": F32x2, "y": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
         b"\0" * 16, "gap"),
        ({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"\0" * 8, "offsets"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)  # fmt: skip
def test_a_lying_header_is_refused(header, data, complaint):
    blob = safetensors_bytes(header, data)
    with pytest.raises(InvalidCheckpoint, match=complaint):
        parse_header(blob, len(blob), "t")


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x05\0\0", (1 << 40).to_bytes(8, "little") + b"{}", (10).to_bytes(8, "little") + b"{}"],
)
def test_a_truncated_file_is_refused(blob):
    with pytest.raises(InvalidCheckpoint, match="truncated|claims"):
        parse_header(blob, len(blob), "t")


def test_a_header_that_is_not_json_is_refused():
    blob = (4).to_bytes(8, "little") + b"{{{{"
    with pytest.raises(InvalidCheckpoint, match="not JSON"):
        parse_header(blob, len(blob), "t")
