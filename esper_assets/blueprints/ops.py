"""The layer ops a blueprint may use: their fields, and what each does to a shape.

Shapes here are per sample (no batch dimension). Each op reports its output
shape, its parameter count and its floating-point operations per sample, so the
spec can reject an inconsistent module before anything is compiled.

FLOPs counting (per sample): a multiply-add is 2 FLOPs, a bias add 1 per output
element, an elementwise activation or a residual add 1 per element, layernorm 5
per element (mean, variance, normalise, scale, shift); dropout (identity at
inference) and flatten are free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Shape = tuple[int, ...]


class ShapeError(Exception):
    """An op cannot take the shape it is given (message goes into a Problem)."""


@dataclass(frozen=True)
class Field:
    kind: Literal["int", "bool", "float"]
    required: bool = False
    default: Any = None
    minimum: float = 0  # ints: value >= minimum; floats: see exclusive_minimum
    exclusive_minimum: bool = False
    exclusive_maximum: float | None = None  # floats: value < this
    bounded: bool = False  # ints: value <= BlueprintLimits.max_dimension

    def rule(self) -> str:
        """Human wording of the constraint, used in problem messages."""
        if self.kind == "bool":
            return "must be true or false"
        if self.kind == "int":
            return "must be a positive integer" if self.minimum == 1 else "must be an integer >= 0"
        low = f"> {self.minimum:g}" if self.exclusive_minimum else f">= {self.minimum:g}"
        if self.exclusive_maximum is not None:
            return f"must be a number {low} and < {self.exclusive_maximum:g}"
        return f"must be a number {low}"


@dataclass(frozen=True)
class Effect:
    output_shape: Shape
    parameters: int
    flops: int


# (shape in, normalised layer, module input shape) -> effect; raises ShapeError.
Infer = Callable[[Shape, Mapping[str, Any], Shape], Effect]


@dataclass(frozen=True)
class Op:
    name: str
    fields: Mapping[str, Field]
    infer: Infer
    summary: str


def numel(shape: Shape) -> int:
    return math.prod(shape)


def show_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _linear(shape: Shape, layer: Mapping[str, Any], _input: Shape) -> Effect:
    fan_in, out = shape[-1], layer["out_features"]
    rows = numel(shape[:-1])
    params = fan_in * out + (out if layer["bias"] else 0)
    flops = rows * (2 * fan_in * out + (out if layer["bias"] else 0))
    return Effect((*shape[:-1], out), params, flops)


def conv2d_output_hw(shape: Shape, layer: Mapping[str, Any]) -> tuple[int, int]:
    k, s, p = layer["kernel_size"], layer["stride"], layer["padding"]
    h, w = shape[1] + 2 * p, shape[2] + 2 * p
    if k > h or k > w:
        raise ShapeError(
            f"kernel_size {k} is larger than the padded input {h}x{w} "
            f"(input {show_shape(shape)}, padding {p})"
        )
    return (h - k) // s + 1, (w - k) // s + 1


def _conv2d(shape: Shape, layer: Mapping[str, Any], _input: Shape) -> Effect:
    if len(shape) != 3:
        raise ShapeError(f"conv2d needs a [C, H, W] input, got {show_shape(shape)}")
    h, w = conv2d_output_hw(shape, layer)
    c_in, c_out, k = shape[0], layer["out_channels"], layer["kernel_size"]
    bias = c_out if layer["bias"] else 0
    params = c_out * c_in * k * k + bias
    flops = h * w * (2 * c_in * k * k * c_out + bias)
    return Effect((c_out, h, w), params, flops)


def _elementwise(shape: Shape, _layer: Mapping[str, Any], _input: Shape) -> Effect:
    return Effect(shape, 0, numel(shape))


def _layernorm(shape: Shape, _layer: Mapping[str, Any], _input: Shape) -> Effect:
    return Effect(shape, 2 * shape[-1], 5 * numel(shape))


def _dropout(shape: Shape, _layer: Mapping[str, Any], _input: Shape) -> Effect:
    return Effect(shape, 0, 0)


def _flatten(shape: Shape, _layer: Mapping[str, Any], _input: Shape) -> Effect:
    return Effect((numel(shape),), 0, 0)


def _residual(shape: Shape, _layer: Mapping[str, Any], module_input: Shape) -> Effect:
    if shape != module_input:
        raise ShapeError(
            f"residual needs shape {show_shape(module_input)} (the module input), "
            f"got {show_shape(shape)}"
        )
    return Effect(shape, 0, numel(shape))


_POSITIVE = Field("int", required=True, minimum=1, bounded=True)
_BIAS = Field("bool", default=True)

OPS: Mapping[str, Op] = {
    op.name: op
    for op in (
        Op(
            "linear",
            {"out_features": _POSITIVE, "bias": _BIAS},
            _linear,
            "y = x W^T + b on the last dim",
        ),
        Op(
            "conv2d",
            {
                "out_channels": _POSITIVE,
                "kernel_size": _POSITIVE,
                "stride": Field("int", default=1, minimum=1, bounded=True),
                "padding": Field("int", default=0, minimum=0, bounded=True),
                "bias": _BIAS,
            },
            _conv2d,
            "square-kernel 2-D convolution over a [C, H, W] input",
        ),
        Op("relu", {}, _elementwise, "max(x, 0)"),
        Op("gelu", {}, _elementwise, "GELU, tanh approximation"),
        Op("tanh", {}, _elementwise, "tanh(x)"),
        Op("sigmoid", {}, _elementwise, "1 / (1 + exp(-x))"),
        Op(
            "layernorm",
            {"eps": Field("float", default=1e-5, minimum=0, exclusive_minimum=True)},
            _layernorm,
            "normalise the last dim, then scale and shift",
        ),
        Op(
            "dropout",
            {"p": Field("float", required=True, minimum=0, exclusive_maximum=1.0)},
            _dropout,
            "identity at inference",
        ),
        Op("flatten", {}, _flatten, "reshape to one dimension"),
        Op("residual", {}, _residual, "add the module input (shapes must match)"),
    )
}

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(OPS))


def parameter_shapes(input_shape: Shape, layers: tuple[Mapping[str, Any], ...]) -> dict[str, Shape]:
    """Name -> shape of every parameter tensor, in layer order (PyTorch layouts).

    linear weight [out, in], conv2d weight [out_c, in_c, k, k], layernorm weight
    and bias [dim]; a bias is named ``layers.<i>.bias``.
    """
    shapes: dict[str, Shape] = {}
    shape = input_shape
    for i, layer in enumerate(layers):
        op = layer["op"]
        if op == "linear":
            shapes[f"layers.{i}.weight"] = (layer["out_features"], shape[-1])
            if layer["bias"]:
                shapes[f"layers.{i}.bias"] = (layer["out_features"],)
        elif op == "conv2d":
            k = layer["kernel_size"]
            shapes[f"layers.{i}.weight"] = (layer["out_channels"], shape[0], k, k)
            if layer["bias"]:
                shapes[f"layers.{i}.bias"] = (layer["out_channels"],)
        elif op == "layernorm":
            shapes[f"layers.{i}.weight"] = (shape[-1],)
            shapes[f"layers.{i}.bias"] = (shape[-1],)
        shape = OPS[op].infer(shape, layer, input_shape).output_shape
    return shapes
