"""Blueprint bytes to a plain document: JSON or YAML, refusing what could hurt us.

Owns :func:`decode` (size limit, suffix, UTF-8, then JSON or YAML) and its
guards: duplicate keys, NaN/Infinity constants, nesting depth (checked on the
YAML event stream before libyaml's recursive composer sees it) and the total
value budget that defuses YAML alias bombs. What comes out is only parsed, not
validated: checks.py does that.

No Dagster here: training processes import this module directly.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import yaml

from esper_assets.blueprints.model import BLUEPRINT_SUFFIXES, BlueprintLimits, Problem

# A 256 KiB YAML file can still alias its way to billions of values (a "YAML
# bomb"); walking the loaded value with these budgets costs at most 100k steps.
MAX_VALUES = 100_000
MAX_DEPTH = 32
TOO_DEEP = f"the document is nested too deeply (limit {MAX_DEPTH} levels)"


def decode(data: bytes, source: str, limits: BlueprintLimits) -> tuple[Any, list[Problem]]:
    """The file's document and its problems; with any problem the document is not to be used."""
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
