"""The blueprint data model: the normalised value, its limits, its problems, its names.

Owns :class:`Blueprint` (what :func:`~esper_assets.blueprints.spec.parse_blueprint`
returns), :class:`BlueprintLimits`, :class:`Problem` and :class:`BlueprintInvalid`,
the naming rules (:func:`name_problem`, :func:`blueprint_name_for_file`) and the
constants the field rules are written in. It imports nothing else from this
package, so the decoder (documents.py), the validator (checks.py) and the
entry point (spec.py) can all build on it without an import cycle.

No Dagster here: training processes import this module directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

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
