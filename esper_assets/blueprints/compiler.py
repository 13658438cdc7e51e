"""Compile a blueprint into a kernel: initialised float32 weights in a safetensors file.

The kernel id is a content address (blueprint content hash, compiler version,
target), so compiling the same blueprint twice must give the same bytes. Two
things make that true:

* weights come from PCG64's raw 64-bit stream (NumPy promises that stream is
  stable across versions) turned into He-uniform values with exact float32
  arithmetic only, so no platform-dependent log/sin/cos is involved;
* the safetensors file is written here, with a sorted header. safetensors'
  own ``save`` writes the metadata map in hash order, which changes from one
  process to the next (checked with safetensors 0.8). The layout follows the
  safetensors format exactly and ``safetensors.numpy.load`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from esper_assets.blueprints.ops import parameter_shapes
from esper_assets.blueprints.spec import Blueprint
from esper_assets.errors import EsperError

COMPILER_VERSION = "1.0.0"
SUPPORTED_TARGETS = ("cpu",)
KERNEL_ID_PREFIX = "k-"
METADATA_PREFIX = "esper."


class CompileError(EsperError):
    """The blueprint cannot be compiled as asked (e.g. for an unsupported target)."""


@dataclass(frozen=True)
class CompiledKernel:
    kernel_id: str
    artifact: bytes
    target: str
    parameter_count: int
    flops_per_sample: int
    compile_ms: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def size_bytes(self) -> int:
        return len(self.artifact)


def kernel_id_for(blueprint: Blueprint, target: str | None = None) -> str:
    """Deterministic id: "k-" + sha256(content hash, compiler version, target).

    Pure: it does not check that the target is supported, so callers may look a
    kernel up before deciding to compile it.
    """
    target = blueprint.target if target is None else target
    key = "\0".join((blueprint.content_hash, COMPILER_VERSION, target))
    return KERNEL_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def compile_blueprint(blueprint: Blueprint, target: str | None = None) -> CompiledKernel:
    started = perf_counter()
    target = blueprint.target if target is None else target
    if target not in SUPPORTED_TARGETS:
        raise CompileError(
            f"blueprint {blueprint.name}@{blueprint.version}: target {target!r} is not supported; "
            f"supported targets: {', '.join(SUPPORTED_TARGETS)}"
        )
    kernel_id = kernel_id_for(blueprint, target)
    tensors = initial_parameters(blueprint)
    artifact = write_safetensors(tensors, _metadata(blueprint, kernel_id, target))
    return CompiledKernel(
        kernel_id=kernel_id,
        artifact=artifact,
        target=target,
        parameter_count=blueprint.parameter_count,
        flops_per_sample=blueprint.flops_per_sample,
        compile_ms=(perf_counter() - started) * 1000,
        input_shape=blueprint.input_shape,
        output_shape=blueprint.output_shape,
    )


def _metadata(blueprint: Blueprint, kernel_id: str, target: str) -> dict[str, str]:
    fields = {
        "kernel_id": kernel_id,
        "blueprint": blueprint.canonical_json().decode(),
        "blueprint_name": blueprint.name,
        "blueprint_version": blueprint.version,
        "content_hash": blueprint.content_hash,
        "compiler_version": COMPILER_VERSION,
        "target": target,
        "input_shape": json.dumps(list(blueprint.input_shape)),
        "output_shape": json.dumps(list(blueprint.output_shape)),
        "parameter_count": str(blueprint.parameter_count),
        "flops_per_sample": str(blueprint.flops_per_sample),
    }
    return {METADATA_PREFIX + key: value for key, value in fields.items()}


def initial_parameters(blueprint: Blueprint) -> dict[str, np.ndarray]:
    """He-uniform weights, small uniform biases, layernorm at identity; seeded by content."""
    bits = np.random.PCG64(int(blueprint.content_hash, 16))
    tensors: dict[str, np.ndarray] = {}
    for name, shape in parameter_shapes(blueprint.input_shape, blueprint.layers).items():
        layer = blueprint.layers[int(name.split(".")[1])]
        if layer["op"] == "layernorm":
            fill = 1.0 if name.endswith(".weight") else 0.0
            tensors[name] = np.full(shape, fill, dtype=np.float32)
            continue
        fan_in = _fan_in(layer, tensors, name, shape)
        # Var(U(-b, b)) = b^2/3, so b = sqrt(6/fan_in) gives He's 2/fan_in.
        bound = math.sqrt(6.0 / fan_in) if name.endswith(".weight") else 1.0 / math.sqrt(fan_in)
        tensors[name] = _uniform(bits, shape, bound)
    return tensors


def _fan_in(layer: dict, tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> int:
    if name.endswith(".bias"):
        weight = tensors[name.removesuffix(".bias") + ".weight"]
        return math.prod(weight.shape[1:])
    return math.prod(shape[1:])


def _uniform(bits: np.random.PCG64, shape: tuple[int, ...], bound: float) -> np.ndarray:
    raw = bits.random_raw(math.prod(shape))
    # Top 24 bits -> an exact float32 in [0, 1); every step after is one exact IEEE op.
    unit = (raw >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    values = (unit * np.float32(2.0) - np.float32(1.0)) * np.float32(bound)
    return values.reshape(shape)


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors layout: u64 LE header length, JSON header, then raw tensor bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format allows space padding; keeps data aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
