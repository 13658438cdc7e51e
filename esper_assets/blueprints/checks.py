"""Field-by-field validation of a decoded blueprint document.

Owns :class:`Checker`, which walks a document from documents.py, records
*every* problem with the path of the offending field, and builds the normalised
:class:`~esper_assets.blueprints.model.Blueprint` (shapes propagated through the
layers, parameters and flops counted, every limit enforced) only when there
were none; plus the small helpers that word its messages.

No Dagster here: training processes import this module directly.
"""

from __future__ import annotations

import difflib
import json
import math
from types import MappingProxyType
from typing import Any

from esper_assets.blueprints.model import (
    DEFAULT_TARGET,
    KNOWN_FIELDS,
    MAX_DESCRIPTION_CHARS,
    MAX_RANK,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_VERSION_CHARS,
    REQUIRED_FIELDS,
    SEMVER_PATTERN,
    Blueprint,
    BlueprintLimits,
    Problem,
    name_problem,
)
from esper_assets.blueprints.ops import OPS, SUPPORTED_OPS, Field, ShapeError, numel, show_shape


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _show_word(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else _describe(value)


def _key_path(key: Any) -> str:
    return key[:64] if isinstance(key, str) else repr(key)[:64]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(word: Any, choices: tuple[str, ...]) -> str:
    if isinstance(word, str):
        close = difflib.get_close_matches(word, choices, n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


class Checker:
    """Collects every problem in one document; ``check`` returns None if there were any."""

    def __init__(self, limits: BlueprintLimits, expected_name: str | None) -> None:
        self.limits = limits
        self.expected_name = expected_name
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def check(self, document: Any) -> Blueprint | None:
        if document is None:
            self.add(
                "", "the document is empty; expected a mapping with " + ", ".join(REQUIRED_FIELDS)
            )
            return None
        if not isinstance(document, dict):
            self.add("", f"the document must be a mapping of fields, got {_describe(document)}")
            return None
        self._fields_present(document)
        name = self._name(document.get("name"))
        version = self._version(document.get("version"))
        parent = self._parent(document.get("parent"), name, version)
        # An optional field left empty in YAML ("tags:") reads as null: treat it as absent.
        tags = self._tags(_or_default(document.get("tags"), []))
        description = self._description(_or_default(document.get("description"), ""))
        properties = self._properties(_or_default(document.get("properties"), {}))
        input_shape = self._input_shape(document.get("input_shape"))
        layers = self._layers(document.get("layers"))
        derived = self._propagate(input_shape, layers)
        if self.problems or derived is None:
            return None
        output_shape, parameters, flops = derived
        return Blueprint(
            name=name,
            version=version,
            parent=parent,
            tags=tags,
            description=description,
            input_shape=input_shape,
            layers=tuple(MappingProxyType(layer) for layer in layers),
            properties=MappingProxyType(properties),
            output_shape=output_shape,
            parameter_count=parameters,
            flops_per_sample=flops,
        )

    def _fields_present(self, document: dict) -> None:
        for key in REQUIRED_FIELDS:
            if key not in document:
                self.add(key, "required field is missing")
        for key in document:
            if key not in KNOWN_FIELDS:
                hint = _did_you_mean(key, KNOWN_FIELDS)
                self.add(
                    _key_path(key), f"unknown field{hint}; known fields: {', '.join(KNOWN_FIELDS)}"
                )

    def _name(self, name: Any) -> Any:
        if name is None:
            return None
        problem = name_problem(name)
        if problem:
            self.add("name", problem)
        elif self.expected_name is not None and name != self.expected_name:
            self.add(
                "name",
                f"the name field says {name!r} but the file stem is {self.expected_name!r}: "
                "they must be equal (rename the file or fix the field)",
            )
        return name

    def _version(self, version: Any) -> Any:
        if version is None:
            return None
        if not isinstance(version, str):
            self.add(
                "version",
                f'must be a string like "1.2.0" (quote it in YAML), got {_describe(version)}',
            )
        elif len(version) > MAX_VERSION_CHARS or not SEMVER_PATTERN.match(version):
            self.add(
                "version",
                f"{version[:MAX_VERSION_CHARS]!r} is not a semantic version "
                "(MAJOR.MINOR.PATCH with an optional -prerelease, e.g. 1.2.0 or 2.0.0-rc.1)",
            )
        return version

    def _parent(self, parent: Any, name: Any, version: Any) -> str | None:
        if parent is None:
            return None
        rule = 'must be a reference like "mlp_base@1.0.0" (name@semantic-version)'
        if not isinstance(parent, str):
            self.add("parent", f"{rule}, got {_describe(parent)}")
            return None
        parent_name, at, parent_version = parent.partition("@")
        if not at:
            self.add("parent", f"{rule}, got {parent[:80]!r}")
            return None
        if name_problem(parent_name):
            self.add("parent", f"{rule}: {name_problem(parent_name)}")
        if len(parent_version) > MAX_VERSION_CHARS or not SEMVER_PATTERN.match(parent_version):
            self.add(
                "parent",
                f"{rule}: {parent_version[:MAX_VERSION_CHARS]!r} is not a semantic version",
            )
        if parent == f"{name}@{version}":
            self.add("parent", "a blueprint cannot be its own parent")
        return parent

    def _tags(self, tags: Any) -> tuple[str, ...]:
        if not isinstance(tags, list):
            self.add("tags", f"must be a list of short strings, got {_describe(tags)}")
            return ()
        if len(tags) > MAX_TAGS:
            self.add("tags", f"{len(tags)} tags; the limit is {MAX_TAGS}")
            return ()
        good: set[str] = set()
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not 1 <= len(tag) <= MAX_TAG_CHARS:
                self.add(
                    f"tags[{i}]",
                    f"must be a string of 1-{MAX_TAG_CHARS} characters, got {_describe(tag)}",
                )
            elif not tag.isprintable() or any(c.isspace() for c in tag):
                self.add(f"tags[{i}]", f"{tag!r} holds whitespace or unprintable characters")
            else:
                good.add(tag)
        return tuple(sorted(good))

    def _description(self, description: Any) -> str:
        if not isinstance(description, str):
            self.add("description", f"must be a string, got {_describe(description)}")
            return ""
        if len(description) > MAX_DESCRIPTION_CHARS:
            self.add(
                "description",
                f"{len(description):,} characters; the limit is {MAX_DESCRIPTION_CHARS:,}",
            )
        return description

    def _properties(self, properties: Any) -> dict[str, Any]:
        if not isinstance(properties, dict):
            self.add(
                "properties", f"must be a JSON object (a mapping), got {_describe(properties)}"
            )
            return {}
        before = len(self.problems)
        self._json_value(properties, "properties")
        target = properties.get("target", DEFAULT_TARGET)
        if not isinstance(target, str) or not target:
            self.add("properties.target", f"must be a non-empty string, got {_describe(target)}")
        if len(self.problems) > before:
            return {}
        return json.loads(json.dumps(properties))  # a private deep copy

    def _json_value(self, value: Any, path: str) -> None:
        """Plain JSON only: YAML can also yield dates, binary, int keys or NaN."""
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.add(path, f"keys must be strings, got {_describe(key)}")
                else:
                    self._json_value(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._json_value(item, f"{path}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            self.add(path, f"{value} is not a JSON number")
        elif value is not None and not isinstance(value, str | int | float | bool):
            self.add(path, f"not a JSON value: {_describe(value)}")

    def _input_shape(self, shape: Any) -> tuple[int, ...] | None:
        if shape is None:
            return None
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
            self.add(
                "input_shape",
                f"must be a list of 1-{MAX_RANK} positive integers, got {_describe(shape)}",
            )
            return None
        ok = True
        for i, dim in enumerate(shape):
            if not _is_int(dim) or dim < 1:
                self.add(f"input_shape[{i}]", f"must be a positive integer, got {_describe(dim)}")
                ok = False
            elif dim > self.limits.max_dimension:
                self.add(
                    f"input_shape[{i}]",
                    f"{dim:,} exceeds the dimension limit of {self.limits.max_dimension:,}",
                )
                ok = False
        return tuple(shape) if ok else None

    def _layers(self, layers: Any) -> list[dict[str, Any] | None]:
        if layers is None:
            return []
        if not isinstance(layers, list) or not layers:
            self.add("layers", f"must be a non-empty list of layers, got {_describe(layers)}")
            return []
        if len(layers) > self.limits.max_layers:
            # Checking thousands of layers would only bury this one real problem.
            self.add("layers", f"{len(layers):,} layers; the limit is {self.limits.max_layers:,}")
            return []
        return [self._layer(layer, f"layers[{i}]") for i, layer in enumerate(layers)]

    def _layer(self, layer: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(layer, dict):
            self.add(path, f"must be a mapping with an 'op', got {_describe(layer)}")
            return None
        op_name = layer.get("op")
        if op_name is None:
            self.add(
                f"{path}.op",
                f"required field is missing; supported ops: {', '.join(SUPPORTED_OPS)}",
            )
            return None
        if not isinstance(op_name, str) or op_name not in OPS:
            hint = _did_you_mean(op_name, SUPPORTED_OPS)
            self.add(
                f"{path}.op",
                f"unknown op {_show_word(op_name)}{hint}; supported ops: {', '.join(SUPPORTED_OPS)}",
            )
            return None
        op = OPS[op_name]
        normalised: dict[str, Any] = {"op": op_name}
        ok = True
        for key in layer:
            if key != "op" and key not in op.fields:
                known = ", ".join(op.fields) or "none"
                hint = _did_you_mean(key, tuple(op.fields))
                self.add(
                    f"{path}.{_key_path(key)}",
                    f"unknown field for {op_name}{hint}; its fields: {known}",
                )
                ok = False
        for key, spec in op.fields.items():
            if key not in layer:
                if spec.required:
                    self.add(f"{path}.{key}", f"required field for {op_name} is missing")
                    ok = False
                else:
                    normalised[key] = spec.default
                continue
            value = self._field_value(layer[key], spec, f"{path}.{key}")
            ok = ok and value is not None
            normalised[key] = value
        return normalised if ok else None

    def _field_value(self, value: Any, spec: Field, path: str) -> Any:
        if spec.kind == "bool":
            if isinstance(value, bool):
                return value
        elif spec.kind == "int":
            if _is_int(value) and value >= spec.minimum:
                if spec.bounded and value > self.limits.max_dimension:
                    self.add(
                        path,
                        f"{value:,} exceeds the dimension limit of {self.limits.max_dimension:,}",
                    )
                    return None
                return value
        elif (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
            low_ok = value > spec.minimum if spec.exclusive_minimum else value >= spec.minimum
            high_ok = spec.exclusive_maximum is None or value < spec.exclusive_maximum
            if low_ok and high_ok:
                return float(value)
        self.add(path, f"{spec.rule()}, got {_describe(value)}")
        return None

    def _propagate(
        self, shape: tuple[int, ...] | None, layers: list[dict[str, Any] | None]
    ) -> tuple[tuple[int, ...], int, int] | None:
        """Walk the shape through the layers; stops at the first layer that is unknown."""
        if shape is None or not layers:
            return None
        limits = self.limits
        if numel(shape) > limits.max_activation_elements:
            self.add(
                "input_shape",
                f"{numel(shape):,} elements per sample; the limit is {limits.max_activation_elements:,}",
            )
            return None
        module_input, parameters, flops = shape, 0, 0
        for i, layer in enumerate(layers):
            if layer is None:
                return None
            try:
                effect = OPS[layer["op"]].infer(shape, layer, module_input)
            except ShapeError as exc:
                self.add(f"layers[{i}]", str(exc))
                return None
            shape = effect.output_shape
            parameters += effect.parameters
            flops += effect.flops
            if not self._shape_within_limits(shape, f"layers[{i}]"):
                return None
        if parameters > limits.max_parameters:
            self.add("layers", f"{parameters:,} parameters; the limit is {limits.max_parameters:,}")
            return None
        return shape, parameters, flops

    def _shape_within_limits(self, shape: tuple[int, ...], path: str) -> bool:
        limits = self.limits
        if max(shape) > limits.max_dimension:
            self.add(
                path,
                f"output {show_shape(shape)} has a dimension above the limit of {limits.max_dimension:,}",
            )
            return False
        if numel(shape) > limits.max_activation_elements:
            self.add(
                path,
                f"output {show_shape(shape)} has {numel(shape):,} elements; "
                f"the limit is {limits.max_activation_elements:,}",
            )
            return False
        return True
