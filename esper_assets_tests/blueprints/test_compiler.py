"""Compiling blueprints to kernels and running them: ids, determinism, numerics, corruption."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from esper_assets.blueprints import (
    COMPILER_VERSION,
    SUPPORTED_TARGETS,
    Blueprint,
    CompiledKernel,
    CompileError,
    LoadedKernel,
    blueprint_name_for_file,
    compile_blueprint,
    compiler,
    example_blueprint_files,
    kernel_id_for,
    load_kernel,
    parse_blueprint,
)
from esper_assets.blueprints.compiler import write_safetensors
from esper_assets.errors import CorruptValue, EsperError, InvalidInput


def blueprint(input_shape: list[int], layers: list[dict[str, Any]], **extra: Any) -> Blueprint:
    document = {"name": "m", "version": "1.0.0", "input_shape": input_shape, "layers": layers}
    document.update(extra)
    return parse_blueprint(json.dumps(document).encode(), source="m.json")


def kernel_for(bp: Blueprint) -> tuple[LoadedKernel, dict[str, np.ndarray]]:
    artifact = compile_blueprint(bp).artifact
    return load_kernel(artifact), safetensors.numpy.load(artifact)


def with_tensors(artifact: bytes, tensors: dict[str, np.ndarray]) -> bytes:
    """The same kernel header with other weights (or other tensors)."""
    (size,) = struct.unpack("<Q", artifact[:8])
    metadata = json.loads(artifact[8 : 8 + size])["__metadata__"]
    return write_safetensors(tensors, metadata)


RNG = np.random.default_rng(7)
EVERY_OP = [
    {"op": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1},
    {"op": "relu"},
    {"op": "gelu"},
    {"op": "tanh"},
    {"op": "sigmoid"},
    {"op": "layernorm"},
    {"op": "dropout", "p": 0.5},
    {"op": "flatten"},
    {"op": "linear", "out_features": 5},
]


# ---------------------------------------------------------------- kernel ids


def test_kernel_id_is_deterministic_and_printable() -> None:
    bp = blueprint([8], [{"op": "linear", "out_features": 4}])
    kernel_id = kernel_id_for(bp)
    assert kernel_id == kernel_id_for(bp) == kernel_id_for(bp, "cpu")
    assert kernel_id.startswith("k-") and len(kernel_id) == 66 and kernel_id.isprintable()
    expected = hashlib.sha256(f"{bp.content_hash}\0{COMPILER_VERSION}\0cpu".encode()).hexdigest()
    assert kernel_id == "k-" + expected


def test_kernel_id_differs_by_target_and_compiler_version(monkeypatch: pytest.MonkeyPatch) -> None:
    bp = blueprint([8], [{"op": "linear", "out_features": 4}])
    cpu = kernel_id_for(bp, "cpu")
    assert kernel_id_for(bp, "cuda") != cpu  # pure: no target check here
    monkeypatch.setattr(compiler, "COMPILER_VERSION", "1.0.1")
    assert kernel_id_for(bp, "cpu") != cpu


def test_kernel_id_follows_content_not_name() -> None:
    layers = [{"op": "linear", "out_features": 4}]
    a = blueprint([8], layers)
    renamed = parse_blueprint(
        json.dumps(
            {"name": "n", "version": "1.0.0", "input_shape": [8], "layers": layers}
        ).encode(),
        source="n.json",
    )
    assert kernel_id_for(a) == kernel_id_for(renamed)
    assert kernel_id_for(a) != kernel_id_for(blueprint([8], [{"op": "linear", "out_features": 5}]))


def test_kernel_id_uses_the_blueprint_target_by_default() -> None:
    bp = blueprint([8], [{"op": "relu"}], properties={"target": "tpu"})
    assert kernel_id_for(bp) == kernel_id_for(bp, "tpu") != kernel_id_for(bp, "cpu")


# ---------------------------------------------------------------- compiling


def test_compiled_kernel_fields() -> None:
    bp = blueprint([8], [{"op": "linear", "out_features": 4}, {"op": "tanh"}])
    kernel = compile_blueprint(bp)
    assert isinstance(kernel, CompiledKernel)
    assert kernel.kernel_id == kernel_id_for(bp)
    assert kernel.target == "cpu" and SUPPORTED_TARGETS == ("cpu",)
    assert kernel.parameter_count == bp.parameter_count == 36
    assert kernel.flops_per_sample == bp.flops_per_sample
    assert kernel.input_shape == (8,) and kernel.output_shape == (4,)
    assert kernel.size_bytes == len(kernel.artifact)
    # compile_ms is reported, not promised: a finite, non-negative measurement.
    assert isinstance(kernel.compile_ms, float) and 0 <= kernel.compile_ms < math.inf


def test_unsupported_target_is_a_compile_error() -> None:
    bp = blueprint([8], [{"op": "relu"}], properties={"target": "cuda"})
    with pytest.raises(
        CompileError, match=r"target 'cuda' is not supported; supported targets: cpu"
    ):
        compile_blueprint(bp)
    with pytest.raises(EsperError):
        compile_blueprint(bp, "gpu")
    assert compile_blueprint(bp, "cpu").target == "cpu"


def test_artifact_header_carries_the_blueprint() -> None:
    bp = blueprint([3, 4, 4], [{"op": "conv2d", "out_channels": 2, "kernel_size": 3}])
    kernel = compile_blueprint(bp)
    (size,) = struct.unpack("<Q", kernel.artifact[:8])
    metadata = json.loads(kernel.artifact[8 : 8 + size])["__metadata__"]
    assert metadata["esper.kernel_id"] == kernel.kernel_id
    assert metadata["esper.blueprint"] == bp.canonical_json().decode()
    assert json.loads(metadata["esper.blueprint"])["name"] == "m"
    assert metadata["esper.blueprint_name"] == "m"
    assert metadata["esper.blueprint_version"] == "1.0.0"
    assert metadata["esper.content_hash"] == bp.content_hash
    assert metadata["esper.compiler_version"] == COMPILER_VERSION
    assert metadata["esper.target"] == "cpu"
    assert json.loads(metadata["esper.input_shape"]) == [3, 4, 4]
    assert json.loads(metadata["esper.output_shape"]) == [2, 2, 2]
    assert all(isinstance(v, str) for v in metadata.values())


def test_artifact_is_a_standard_safetensors_file() -> None:
    bp = blueprint(
        [3, 4, 4], [{"op": "conv2d", "out_channels": 2, "kernel_size": 3}, {"op": "layernorm"}]
    )
    tensors = safetensors.numpy.load(compile_blueprint(bp).artifact)
    assert {name: t.shape for name, t in tensors.items()} == {
        "layers.0.weight": (2, 3, 3, 3),
        "layers.0.bias": (2,),
        "layers.1.weight": (2,),
        "layers.1.bias": (2,),
    }
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["layers.1.weight"], np.ones(2, np.float32))
    np.testing.assert_array_equal(tensors["layers.1.bias"], np.zeros(2, np.float32))


def test_weights_are_he_scaled() -> None:
    bp = blueprint([256], [{"op": "linear", "out_features": 512}])
    weights = safetensors.numpy.load(compile_blueprint(bp).artifact)["layers.0.weight"]
    bound = math.sqrt(6 / 256)
    assert np.abs(weights).max() <= bound
    assert weights.std() == pytest.approx(math.sqrt(2 / 256), rel=0.02)


def test_recompiling_gives_byte_identical_artifacts() -> None:
    bp = blueprint([3, 8, 8], EVERY_OP)
    assert compile_blueprint(bp).artifact == compile_blueprint(bp).artifact
    reparsed = parse_blueprint(bp.canonical_json(), source="m.json")
    assert compile_blueprint(reparsed).artifact == compile_blueprint(bp).artifact


def test_artifact_is_identical_in_another_process() -> None:
    """safetensors' own save() orders metadata by a per-process hash; ours must not."""
    path = example_blueprint_files()[0]
    script = (
        "import hashlib, pathlib, sys\n"
        "from esper_assets.blueprints import compile_blueprint, parse_blueprint\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "bp = parse_blueprint(p.read_bytes(), source=str(p))\n"
        "print(hashlib.sha256(compile_blueprint(bp).artifact).hexdigest())\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    bp = parse_blueprint(path.read_bytes(), source=str(path))
    assert other == hashlib.sha256(compile_blueprint(bp).artifact).hexdigest()


def test_weights_follow_the_content_hash() -> None:
    a = blueprint([8], [{"op": "linear", "out_features": 4}])
    b = blueprint([8], [{"op": "linear", "out_features": 4}], description="different")
    wa = safetensors.numpy.load(compile_blueprint(a).artifact)["layers.0.weight"]
    wb = safetensors.numpy.load(compile_blueprint(b).artifact)["layers.0.weight"]
    assert not np.array_equal(wa, wb)


# ---------------------------------------------------------------- counts


def test_parameter_count_and_flops_of_a_small_linear_model() -> None:
    bp = blueprint(
        [4],
        [
            {"op": "linear", "out_features": 3},
            {"op": "relu"},
            {"op": "linear", "out_features": 2, "bias": False},
        ],
    )
    assert bp.parameter_count == (4 * 3 + 3) + 3 * 2 == 21
    # 2 per multiply-add, 1 per bias add, 1 per relu element
    assert bp.flops_per_sample == (2 * 4 * 3 + 3) + 3 + 2 * 3 * 2 == 42
    assert compile_blueprint(bp).parameter_count == 21
    assert load_kernel(compile_blueprint(bp).artifact).parameter_count == 21


def test_parameter_count_and_flops_of_a_small_conv_model() -> None:
    bp = blueprint(
        [2, 5, 5],
        [
            {"op": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 2, "padding": 1},
            {"op": "flatten"},
            {"op": "linear", "out_features": 4},
        ],
    )
    # conv output: (5 + 2*1 - 3) // 2 + 1 = 3, so [3, 3, 3] -> 27 -> 4
    assert bp.output_shape == (4,)
    conv_params, conv_flops = 3 * 2 * 3 * 3 + 3, 3 * 3 * (2 * 2 * 3 * 3 * 3 + 3)
    linear_params, linear_flops = 27 * 4 + 4, 2 * 27 * 4 + 4
    assert (conv_params, conv_flops) == (57, 999)
    assert bp.parameter_count == conv_params + linear_params == 169
    assert bp.flops_per_sample == conv_flops + linear_flops == 1219


def test_layernorm_and_elementwise_counts() -> None:
    bp = blueprint(
        [4, 6],
        [{"op": "layernorm"}, {"op": "gelu"}, {"op": "residual"}, {"op": "dropout", "p": 0.1}],
    )
    assert bp.parameter_count == 2 * 6
    assert bp.flops_per_sample == 5 * 24 + 24 + 24


# ---------------------------------------------------------------- forward: shapes


@pytest.mark.parametrize("layer", EVERY_OP, ids=[layer["op"] for layer in EVERY_OP])
def test_forward_shape_for_every_op(layer: dict[str, Any]) -> None:
    shape = [3, 8, 8]
    bp = blueprint(shape, [layer])
    kernel = load_kernel(compile_blueprint(bp).artifact)
    single = kernel.forward(RNG.standard_normal(shape))
    batch = kernel.forward(RNG.standard_normal([5, *shape]))
    assert single.shape == bp.output_shape and single.dtype == np.float32
    assert batch.shape == (5, *bp.output_shape) and batch.dtype == np.float32


def test_forward_for_residual() -> None:
    kernel, _ = kernel_for(blueprint([6], [{"op": "tanh"}, {"op": "residual"}]))
    x = RNG.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(kernel.forward(x), np.tanh(x) + x, rtol=1e-6)


def test_every_example_compiles_and_runs() -> None:
    for path in example_blueprint_files():
        bp = parse_blueprint(
            path.read_bytes(), source=str(path), expected_name=blueprint_name_for_file(path.name)
        )
        compiled = compile_blueprint(bp)
        kernel = load_kernel(compiled.artifact)
        assert kernel.kernel_id == compiled.kernel_id
        assert kernel.blueprint == bp.canonical()
        x = RNG.standard_normal((3, *bp.input_shape)).astype(np.float32)
        batch = kernel.forward(x)
        assert batch.shape == (3, *bp.output_shape), bp.name
        assert np.isfinite(batch).all(), bp.name
        # a batch row equals that sample run alone
        np.testing.assert_allclose(kernel.forward(x[1]), batch[1], rtol=1e-5, atol=1e-6)


def test_batch_of_zero_samples() -> None:
    kernel, _ = kernel_for(blueprint([3, 8, 8], EVERY_OP))
    assert kernel.forward(np.zeros((0, 3, 8, 8))).shape == (0, 5)


def test_integer_input_is_converted() -> None:
    kernel, _ = kernel_for(blueprint([4], [{"op": "relu"}]))
    out = kernel.forward(np.array([-2, -1, 1, 2]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0, 0, 1, 2])


@pytest.mark.parametrize("shape", [(5,), (2, 5), (4, 1), (1, 1, 4), ()])
def test_wrong_input_shape(shape: tuple[int, ...]) -> None:
    kernel, _ = kernel_for(blueprint([4], [{"op": "relu"}]))
    with pytest.raises(InvalidInput, match=r"expected input of shape \[4\] or \[N, 4\], got"):
        kernel.forward(np.zeros(shape))


def test_non_numeric_input() -> None:
    kernel, _ = kernel_for(blueprint([2], [{"op": "relu"}]))
    with pytest.raises(InvalidInput, match="must be numeric"):
        kernel.forward(np.array(["a", "b"]))


# ---------------------------------------------------------------- forward: numerics


def test_linear_relu_matches_numpy() -> None:
    kernel, w = kernel_for(
        blueprint(
            [6],
            [
                {"op": "linear", "out_features": 5},
                {"op": "relu"},
                {"op": "linear", "out_features": 3},
            ],
        )
    )
    x = RNG.standard_normal((4, 6))
    hidden = np.maximum(x @ w["layers.0.weight"].T.astype(np.float64) + w["layers.0.bias"], 0)
    expected = hidden @ w["layers.2.weight"].T.astype(np.float64) + w["layers.2.bias"]
    np.testing.assert_allclose(kernel.forward(x), expected, rtol=1e-5, atol=1e-6)


def test_linear_on_the_last_dim_of_a_matrix() -> None:
    kernel, w = kernel_for(blueprint([3, 4], [{"op": "linear", "out_features": 2, "bias": False}]))
    x = RNG.standard_normal((3, 4))
    np.testing.assert_allclose(kernel.forward(x), x @ w["layers.0.weight"].T, rtol=1e-5, atol=1e-6)


def test_residual_adds_the_module_input() -> None:
    kernel, w = kernel_for(
        blueprint([4], [{"op": "linear", "out_features": 4}, {"op": "residual"}])
    )
    x = RNG.standard_normal(4)
    expected = x @ w["layers.0.weight"].T + w["layers.0.bias"] + x
    np.testing.assert_allclose(kernel.forward(x), expected, rtol=1e-5, atol=1e-6)


def test_layernorm_matches_numpy_with_trained_weights() -> None:
    bp = blueprint([2, 8], [{"op": "layernorm", "eps": 1e-3}])
    artifact = compile_blueprint(bp).artifact
    gamma = RNG.standard_normal(8).astype(np.float32)
    beta = RNG.standard_normal(8).astype(np.float32)
    kernel = load_kernel(with_tensors(artifact, {"layers.0.weight": gamma, "layers.0.bias": beta}))
    x = RNG.standard_normal((3, 2, 8)) * 4 + 1
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-3) * gamma + beta
    np.testing.assert_allclose(kernel.forward(x), expected, rtol=1e-4, atol=1e-5)


def _conv_reference(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int
) -> np.ndarray:
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    c_out, _, k, _ = w.shape
    h = (x.shape[1] - k) // stride + 1
    wd = (x.shape[2] - k) // stride + 1
    out = np.zeros((c_out, h, wd))
    for o in range(c_out):
        for i in range(h):
            for j in range(wd):
                patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k]
                out[o, i, j] = (patch * w[o]).sum() + b[o]
    return out


@pytest.mark.parametrize(("stride", "pad"), [(1, 0), (2, 1), (3, 2)])
def test_conv2d_matches_a_loop_reference(stride: int, pad: int) -> None:
    layer = {"op": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": stride, "padding": pad}
    kernel, w = kernel_for(blueprint([2, 7, 6], [layer]))
    x = RNG.standard_normal((2, 7, 6))
    expected = _conv_reference(x, w["layers.0.weight"], w["layers.0.bias"], stride, pad)
    got = kernel.forward(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv2d_without_bias() -> None:
    layer = {"op": "conv2d", "out_channels": 2, "kernel_size": 2, "bias": False}
    kernel, w = kernel_for(blueprint([1, 3, 3], [layer]))
    assert set(w) == {"layers.0.weight"}
    x = RNG.standard_normal((1, 3, 3))
    expected = _conv_reference(x, w["layers.0.weight"], np.zeros(2), 1, 0)
    np.testing.assert_allclose(kernel.forward(x), expected, rtol=1e-5, atol=1e-5)


def test_activations_match_numpy() -> None:
    x = np.linspace(-6, 6, 25)
    gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    cases = {
        "relu": np.maximum(x, 0),
        "tanh": np.tanh(x),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "gelu": gelu,  # the tanh approximation
        "dropout": x,  # identity at inference
        "flatten": x,
    }
    for op, expected in cases.items():
        layer = {"op": op, "p": 0.3} if op == "dropout" else {"op": op}
        kernel, _ = kernel_for(blueprint([25], [layer]))
        np.testing.assert_allclose(kernel.forward(x), expected, rtol=1e-5, atol=1e-6, err_msg=op)


def test_activations_survive_extreme_inputs() -> None:
    x = np.array([-1e30, -100, 0, 100, 1e30], dtype=np.float32)
    for op in ("gelu", "sigmoid", "tanh"):
        kernel, _ = kernel_for(blueprint([5], [{"op": op}]))
        with np.errstate(all="raise"):
            out = kernel.forward(x)
        assert np.isfinite(out).all(), op


# ---------------------------------------------------------------- corrupt artifacts


@pytest.fixture(scope="module")
def artifact() -> bytes:
    return compile_blueprint(blueprint([4], [{"op": "linear", "out_features": 3}])).artifact


def test_load_kernel_round_trip(artifact: bytes) -> None:
    kernel = load_kernel(artifact)
    assert kernel.kernel_id.startswith("k-")
    assert kernel.header["esper.kernel_id"] == kernel.kernel_id
    assert kernel.blueprint["name"] == "m"
    assert kernel.input_shape == (4,) and kernel.output_shape == (3,)
    assert kernel.parameter_count == 15
    assert load_kernel(bytearray(artifact)).kernel_id == kernel.kernel_id
    assert "m@1.0.0" in repr(kernel)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda a: a[:-10],  # truncated data
        lambda a: a[:4],  # truncated length prefix
        lambda a: a[:40],  # truncated header
        lambda a: b"",
        lambda a: a[:8] + b"X" + a[9:],  # header no longer JSON
        lambda a: struct.pack("<Q", 1 << 60) + a[8:],  # absurd header length
        lambda a: b"\x00" * 64,
        lambda a: b"not a kernel at all, just text of some length",
        lambda a: a[:8] + a[8:].replace(b'"F32"', b'"F64"', 1),  # dtype flipped: sizes disagree
    ],
    ids=["truncated", "prefix", "header", "empty", "flipped", "length", "zeros", "text", "dtype"],
)
def test_corrupt_artifacts_raise_corrupt_value(artifact: bytes, mangle: Any) -> None:
    with pytest.raises(CorruptValue):
        load_kernel(mangle(artifact))


def test_plain_safetensors_file_is_not_a_kernel() -> None:
    data = safetensors.numpy.save({"w": np.zeros(3, np.float32)})
    with pytest.raises(CorruptValue, match="no metadata"):
        load_kernel(data)
    data = safetensors.numpy.save(
        {"w": np.zeros(3, np.float32)}, metadata={"esper.kernel_id": "k-1"}
    )
    with pytest.raises(CorruptValue, match="metadata lacks esper.blueprint,"):
        load_kernel(data)


def _with_metadata(artifact: bytes, **changes: str) -> bytes:
    (size,) = struct.unpack("<Q", artifact[:8])
    metadata = json.loads(artifact[8 : 8 + size])["__metadata__"]
    metadata.update(changes)
    return write_safetensors(safetensors.numpy.load(artifact), metadata)


def test_tampered_header_is_detected(artifact: bytes) -> None:
    with pytest.raises(CorruptValue, match="content_hash"):
        load_kernel(_with_metadata(artifact, **{"esper.content_hash": "0" * 64}))
    with pytest.raises(CorruptValue, match="output_shape"):
        load_kernel(_with_metadata(artifact, **{"esper.output_shape": "[4]"}))
    with pytest.raises(CorruptValue, match="embedded blueprint is invalid"):
        load_kernel(_with_metadata(artifact, **{"esper.blueprint": "{}"}))


def test_tensors_that_do_not_fit_the_blueprint(artifact: bytes) -> None:
    wrong = {
        "layers.0.weight": np.zeros((3, 5), np.float32),
        "layers.0.bias": np.zeros(3, np.float32),
    }
    with pytest.raises(CorruptValue, match="tensors do not match"):
        load_kernel(with_tensors(artifact, wrong))
    with pytest.raises(CorruptValue, match="tensors do not match"):
        load_kernel(with_tensors(artifact, {"layers.0.weight": np.zeros((3, 4), np.float32)}))


def test_load_kernel_wants_bytes() -> None:
    with pytest.raises(InvalidInput):
        load_kernel("k-123")  # type: ignore[arg-type]
