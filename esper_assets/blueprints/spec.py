"""Blueprint files: parse, validate every rule, and hand back one normalised value.

A blueprint is a small JSON or YAML document describing a network module::

    name: residual_mlp            # [a-z0-9][a-z0-9_-]{0,63}, equal to the file's stem
    version: 1.2.0                # semantic version
    parent: mlp_base@1.0.0        # optional "name@version"
    tags: [mlp, residual]         # optional
    description: two-layer MLP with a skip connection   # optional
    input_shape: [64]             # per sample, 1-4 positive ints
    layers:                       # ops and their fields: see ops.py
      - {op: linear, out_features: 128}
      - {op: gelu}
      - {op: linear, out_features: 64}
      - {op: residual}
    properties: {target: cpu}     # optional JSON object

:func:`parse_blueprint` checks the whole document and raises
:class:`BlueprintInvalid` listing *every* problem it found, each with the path
of the offending field, so an author fixes a file in one go.

No Dagster here: training processes import this module directly.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

import yaml

from esper_assets.blueprints.ops import OPS, SUPPORTED_OPS, Field, ShapeError, numel, show_shape
from esper_assets.errors import InvalidInput

# \A...\Z rather than ^...$: "$" also matches before a trailing newline.
NAME_PATTERN = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,63}\Z")
BLUEPRINT_SUFFIXES = (".yaml", ".yml", ".json")
_SEMVER_IDENT = r"(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
SEMVER_PATTERN = re.compile(
    r"\A(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    rf"(?:-{_SEMVER_IDENT}(?:\.{_SEMVER_IDENT})*)?\Z"
)

REQUIRED_FIELDS = ("name", "version", "input_shape", "layers")
OPTIONAL_FIELDS = ("parent", "tags", "description", "properties")
KNOWN_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
MAX_RANK = 4
MAX_VERSION_CHARS = 64
MAX_TAGS = 32
MAX_TAG_CHARS = 32
MAX_DESCRIPTION_CHARS = 4096
# A 256 KiB YAML file can still alias its way to billions of values (a "YAML
# bomb"); walking the loaded value with these budgets costs at most 100k steps.
MAX_VALUES = 100_000
MAX_DEPTH = 32
TOO_DEEP = f"the document is nested too deeply (limit {MAX_DEPTH} levels)"
DEFAULT_TARGET = "cpu"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a blueprint: ``path`` is e.g. ``layers[2].out_features``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class BlueprintInvalid(InvalidInput):
    """A blueprint file broke one or more rules; ``problems`` lists them all."""

    MAX_LISTED = 200  # keeps the message readable; .problems always has them all

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.problems)
        listed = "; ".join(str(p) for p in self.problems[: self.MAX_LISTED])
        if n > self.MAX_LISTED:
            listed += f"; ... and {n - self.MAX_LISTED} more (see .problems)"
        return f"{self.source}: {n} problem(s): {listed}. Fix the file and land it again."


@dataclass(frozen=True)
class BlueprintLimits:
    """Caller-configurable ceilings; every one is checked before anything is compiled."""

    max_file_bytes: int = 256 * 1024
    max_layers: int = 256
    max_parameters: int = 20_000_000
    max_dimension: int = 65536
    # Not in the original brief: bounds the per-sample element count of every
    # tensor (input included), so a valid blueprint cannot ask forward() for
    # terabytes through a [65536, 65536] input shape.
    max_activation_elements: int = 16_777_216


@dataclass(frozen=True)
class Blueprint:
    """A validated, normalised blueprint. Build it with :func:`parse_blueprint`."""

    name: str
    version: str
    parent: str | None  # "name@version"
    tags: tuple[str, ...]
    description: str
    input_shape: tuple[int, ...]
    layers: tuple[Mapping[str, Any], ...]
    properties: Mapping[str, Any]
    output_shape: tuple[int, ...]
    parameter_count: int
    flops_per_sample: int

    def __hash__(self) -> int:
        return hash((self.name, self.content_hash))

    @property
    def parent_name(self) -> str | None:
        return self.parent.split("@", 1)[0] if self.parent else None

    @property
    def parent_version(self) -> str | None:
        return self.parent.split("@", 1)[1] if self.parent else None

    @property
    def target(self) -> str:
        return self.properties.get("target", DEFAULT_TARGET)

    def canonical(self) -> dict[str, Any]:
        """The normalised document, JSON-ready, without the derived fields."""
        return {
            "name": self.name,
            "version": self.version,
            "parent": self.parent,
            "tags": list(self.tags),
            "description": self.description,
            "input_shape": list(self.input_shape),
            "layers": [dict(layer) for layer in self.layers],
            # A round trip gives the caller a deep copy it may mutate freely.
            "properties": json.loads(json.dumps(dict(self.properties))),
        }

    def canonical_json(self) -> bytes:
        return _canonical_bytes(self.canonical())

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the canonical document minus its name: a renamed copy hashes the same."""
        document = self.canonical()
        del document["name"]
        return hashlib.sha256(_canonical_bytes(document)).hexdigest()


def _canonical_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def name_problem(name: str) -> str | None:
    """None if ``name`` is a valid blueprint name (and partition key), else why not."""
    if not isinstance(name, str):
        return f"a blueprint name must be a string, got {type(name).__name__}"
    if NAME_PATTERN.match(name):
        return None
    shown = repr(name) if len(name) <= 40 else f"{name[:32]!r}... ({len(name)} characters)"
    return (
        f"{shown} is not a valid blueprint name: use 1-64 of a-z 0-9 _ -, "
        "starting with a letter or digit"
    )


def blueprint_name_for_file(filename: str) -> str:
    """The blueprint name a file must carry: its base name minus one known suffix."""
    base = PurePosixPath(str(filename).replace("\\", "/")).name
    for suffix in BLUEPRINT_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def parse_blueprint(
    data: bytes,
    *,
    source: str,
    limits: BlueprintLimits = BlueprintLimits(),  # noqa: B008 - frozen, safe to share
    expected_name: str | None = None,
) -> Blueprint:
    """Decode and validate one blueprint file; raise BlueprintInvalid listing every problem."""
    document, problems = _decode(data, source, limits)
    if not problems:
        checker = _Checker(limits, expected_name)
        blueprint = checker.check(document)
        problems = checker.problems
        if not problems and blueprint is not None:
            return blueprint
    raise BlueprintInvalid(source, problems)


# ---------------------------------------------------------------- decoding


def _decode(data: bytes, source: str, limits: BlueprintLimits) -> tuple[Any, list[Problem]]:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        return None, [Problem("", f"expected the file's bytes, got {type(data).__name__}")]
    if len(data) > limits.max_file_bytes:
        return None, [
            Problem("", f"the file is {len(data):,} bytes; the limit is {limits.max_file_bytes:,}")
        ]
    suffix = PurePosixPath(source).suffix.lower()
    if suffix not in BLUEPRINT_SUFFIXES:
        return None, [
            Problem(
                "", f"unknown file type {suffix or '(none)'!r}: use {', '.join(BLUEPRINT_SUFFIXES)}"
            )
        ]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, [
            Problem("", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}")
        ]
    try:
        document = _load_json(text) if suffix == ".json" else _load_yaml(text)
    except _SyntaxProblem as exc:
        return None, [Problem("", str(exc))]
    except RecursionError:
        return None, [Problem("", TOO_DEEP)]
    size_problem = _size_problem(document)
    return document, [Problem("", size_problem)] if size_problem else []


class _SyntaxProblem(Exception):
    pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _SyntaxProblem(
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:  # our hooks, or an integer with thousands of digits
        raise _SyntaxProblem(f"invalid JSON: {exc}") from None


class _StrictSafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """safe_load semantics (plain data only) that also refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" then overriding a merged key is legitimate
            key = self.construct_object(key_node, deep=False)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base class reports it with its mark
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    try:
        _check_yaml_depth(text)
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if mark is not None and _too_deep_before(text, mark.index):
            raise _SyntaxProblem(TOO_DEEP) from None
        what = ", ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _SyntaxProblem(f"invalid YAML{where}: {what}") from None
    except yaml.YAMLError as exc:  # e.g. a reader error on a control character
        raise _SyntaxProblem(f"invalid YAML: {exc}") from None


def _check_yaml_depth(text: str) -> None:
    """Refuse deep nesting from the event stream, before anything recursive sees it.

    libyaml's composer recurses in C: ``[[[[...`` 100,000 levels deep kills the
    process with a segmentation fault instead of raising RecursionError.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_StrictSafeLoader):
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _SyntaxProblem(TOO_DEEP)
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1


def _too_deep_before(text: str, index: int) -> bool:
    """Is the document already nested deeper than MAX_DEPTH before ``index``?

    Newer libyaml (PyYAML 6.0.4's wheels) refuses deep nesting itself, with its own
    limit and words, and its scanner may look that far ahead before the event walk
    above sees one event. Walking the text up to where it stopped tells the two
    apart, so deep nesting is reported the same way whichever of us noticed first.
    """
    if index <= 0:
        return False
    try:
        _check_yaml_depth(text[:index])
    except _SyntaxProblem:
        return True
    except yaml.YAMLError:  # the cut-off text ends mid-document
        return False
    return False


def _size_problem(document: Any) -> str | None:
    """Walk the loaded value within budgets; aliases count once per use, as JSON would."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"the document expands to more than {MAX_VALUES:,} values (YAML aliases?)"
        if depth > MAX_DEPTH:
            return TOO_DEEP
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None


# ---------------------------------------------------------------- validation


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


class _Checker:
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
