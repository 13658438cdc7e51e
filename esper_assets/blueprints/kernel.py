"""Load a compiled kernel artifact and run it on the CPU with NumPy (float32 throughout).

GELU uses the tanh approximation (as in GPT-2 and ``torch.nn.GELU(approximate="tanh")``);
sigmoid is computed as ``0.5 * (1 + tanh(x / 2))``, which is exact and never overflows.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from numpy.lib.stride_tricks import sliding_window_view

from esper_assets.blueprints.compiler import METADATA_PREFIX
from esper_assets.blueprints.ops import parameter_shapes, show_shape
from esper_assets.blueprints.spec import (
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    parse_blueprint,
)
from esper_assets.errors import CorruptValue, InvalidInput

REQUIRED_METADATA = tuple(
    METADATA_PREFIX + key
    for key in (
        "kernel_id",
        "blueprint",
        "blueprint_name",
        "blueprint_version",
        "content_hash",
        "compiler_version",
        "target",
        "input_shape",
        "output_shape",
    )
)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own ceiling


class LoadedKernel:
    """A kernel ready to run: ``forward`` takes one sample or a batch."""

    def __init__(self, header: dict[str, str], spec: Blueprint, tensors: dict[str, np.ndarray]):
        self.header = header
        self.kernel_id = header[METADATA_PREFIX + "kernel_id"]
        self.target = header[METADATA_PREFIX + "target"]
        self.compiler_version = header[METADATA_PREFIX + "compiler_version"]
        self.blueprint: dict[str, Any] = spec.canonical()
        self.input_shape = spec.input_shape
        self.output_shape = spec.output_shape
        self.parameter_count = sum(t.size for t in tensors.values())
        self._spec = spec
        self._tensors = tensors

    def __repr__(self) -> str:
        return (
            f"LoadedKernel({self.kernel_id[:14]}..., {self._spec.name}@{self._spec.version}, "
            f"{show_shape(self.input_shape)} -> {show_shape(self.output_shape)})"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """[*input_shape] -> [*output_shape], or [N, *input_shape] -> [N, *output_shape]."""
        batch, single = self._as_batch(x)
        out = batch
        for i, layer in enumerate(self._spec.layers):
            out = _FORWARD[layer["op"]](out, layer, self._params(i), batch)
        out = out.astype(np.float32, copy=False)
        return out[0] if single else out

    def _as_batch(self, x: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise InvalidInput(
                f"kernel {self.kernel_id}: input must be numeric, got dtype {arr.dtype}"
            )
        if arr.shape == self.input_shape:
            return arr.astype(np.float32)[None], True
        if arr.ndim == len(self.input_shape) + 1 and arr.shape[1:] == self.input_shape:
            return arr.astype(np.float32), False
        expected = show_shape(self.input_shape)
        raise InvalidInput(
            f"kernel {self.kernel_id}: expected input of shape {expected} or [N, "
            f"{expected[1:-1]}], got {show_shape(arr.shape)}"
        )

    def _params(self, i: int) -> Mapping[str, np.ndarray]:
        prefix = f"layers.{i}."
        return {
            name.removeprefix(prefix): t
            for name, t in self._tensors.items()
            if name.startswith(prefix)
        }


# ---------------------------------------------------------------- loading


def load_kernel(data: bytes) -> LoadedKernel:
    """Parse and verify a :func:`compile_blueprint` artifact; CorruptValue if it is not one."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidInput(f"a kernel artifact is bytes, got {type(data).__name__}")
    header = _read_header(data)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own error type, or others on garbage
        raise CorruptValue(f"kernel artifact is not a valid safetensors file: {exc}") from None
    metadata = _esper_metadata(header)
    spec = _embedded_blueprint(metadata)
    _verify(metadata, spec, tensors)
    return LoadedKernel(metadata, spec, tensors)


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptValue(
            f"kernel artifact is {len(data)} bytes: too short for a safetensors header"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise CorruptValue(
            f"kernel artifact header claims {size:,} bytes; the file holds {len(data) - 8:,}"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptValue(f"kernel artifact header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptValue("kernel artifact header is not a JSON object")
    return header


def _esper_metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise CorruptValue("not an esper kernel: the safetensors file has no metadata")
    missing = [key for key in REQUIRED_METADATA if not isinstance(metadata.get(key), str)]
    if missing:
        raise CorruptValue(f"not an esper kernel: metadata lacks {', '.join(missing)}")
    return dict(metadata)


def _embedded_blueprint(metadata: dict[str, str]) -> Blueprint:
    document = metadata[METADATA_PREFIX + "blueprint"].encode()
    # It passed the caller's limits when it was compiled; do not re-judge it by ours.
    trusting = BlueprintLimits(
        max_file_bytes=len(document),
        max_layers=1 << 20,
        max_parameters=1 << 40,
        max_dimension=1 << 31,
        max_activation_elements=1 << 40,
    )
    kernel_id = metadata[METADATA_PREFIX + "kernel_id"]
    try:
        return parse_blueprint(document, source=f"{kernel_id}.json", limits=trusting)
    except BlueprintInvalid as exc:
        raise CorruptValue(f"kernel {kernel_id}: embedded blueprint is invalid: {exc}") from None


def _verify(metadata: dict[str, str], spec: Blueprint, tensors: dict[str, np.ndarray]) -> None:
    """The header, the embedded blueprint and the tensors must all tell the same story."""
    kernel_id = metadata[METADATA_PREFIX + "kernel_id"]
    claims = {
        "content_hash": (metadata[METADATA_PREFIX + "content_hash"], spec.content_hash),
        "input_shape": (
            metadata[METADATA_PREFIX + "input_shape"],
            json.dumps(list(spec.input_shape)),
        ),
        "output_shape": (
            metadata[METADATA_PREFIX + "output_shape"],
            json.dumps(list(spec.output_shape)),
        ),
    }
    for what, (stated, derived) in claims.items():
        if stated != derived:
            raise CorruptValue(
                f"kernel {kernel_id}: header {what} {stated} does not match its blueprint ({derived})"
            )
    expected = parameter_shapes(spec.input_shape, spec.layers)
    actual = {name: t.shape for name, t in tensors.items()}
    if actual != expected or any(t.dtype != np.float32 for t in tensors.values()):
        raise CorruptValue(f"kernel {kernel_id}: tensors do not match the blueprint's parameters")


# ---------------------------------------------------------------- ops on [N, ...] batches

Params = Mapping[str, np.ndarray]
_GELU_C = math.sqrt(2.0 / math.pi)  # Python floats keep float32 arrays float32


def _linear(x: np.ndarray, layer: Mapping, p: Params, _inp: np.ndarray) -> np.ndarray:
    y = x @ p["weight"].T
    return y + p["bias"] if layer["bias"] else y


def _conv2d(x: np.ndarray, layer: Mapping, p: Params, _inp: np.ndarray) -> np.ndarray:
    k, s, pad = layer["kernel_size"], layer["stride"], layer["padding"]
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # [N, C, H', W', k, k] view; striding picks every s-th window. tensordot does the im2col copy.
    windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    y = np.tensordot(windows, p["weight"], axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    return y + p["bias"][:, None, None] if layer["bias"] else y


def _layernorm(x: np.ndarray, layer: Mapping, p: Params, _inp: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + layer["eps"]) * p["weight"] + p["bias"]


def _gelu(x: np.ndarray, _layer: Mapping, _p: Params, _inp: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # x**3 may overflow to inf; tanh(inf) = 1 is still right
        return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


_Forward = Callable[[np.ndarray, Mapping, Params, np.ndarray], np.ndarray]
_FORWARD: Mapping[str, _Forward] = {
    "linear": _linear,
    "conv2d": _conv2d,
    "relu": lambda x, *_: np.maximum(x, np.float32(0)),
    "gelu": _gelu,
    "tanh": lambda x, *_: np.tanh(x),
    "sigmoid": lambda x, *_: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "layernorm": _layernorm,
    "dropout": lambda x, *_: x,
    # An explicit size, not -1: reshape cannot infer it for an empty batch.
    "flatten": lambda x, *_: x.reshape(x.shape[0], math.prod(x.shape[1:])),
    "residual": lambda x, _layer, _p, inp: x + inp,
}
