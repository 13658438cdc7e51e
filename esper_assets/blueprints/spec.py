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

The work is split by stage: documents.py turns bytes into a plain document,
checks.py validates it field by field, and model.py holds the types and
constants both share. This module ties them together and re-exports the public
names it always offered, so ``from esper_assets.blueprints.spec import ...``
keeps working.

No Dagster here: training processes import this module directly.
"""

from __future__ import annotations

from esper_assets.blueprints.checks import Checker
from esper_assets.blueprints.documents import MAX_DEPTH, MAX_VALUES, TOO_DEEP, decode
from esper_assets.blueprints.model import (
    BLUEPRINT_SUFFIXES,
    DEFAULT_TARGET,
    KNOWN_FIELDS,
    MAX_DESCRIPTION_CHARS,
    MAX_RANK,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_VERSION_CHARS,
    NAME_PATTERN,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SEMVER_PATTERN,
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    Problem,
    blueprint_name_for_file,
    name_problem,
)

__all__ = [
    "BLUEPRINT_SUFFIXES",
    "DEFAULT_TARGET",
    "KNOWN_FIELDS",
    "MAX_DEPTH",
    "MAX_DESCRIPTION_CHARS",
    "MAX_RANK",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "MAX_VALUES",
    "MAX_VERSION_CHARS",
    "NAME_PATTERN",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "SEMVER_PATTERN",
    "TOO_DEEP",
    "Blueprint",
    "BlueprintInvalid",
    "BlueprintLimits",
    "Problem",
    "blueprint_name_for_file",
    "name_problem",
    "parse_blueprint",
]


def parse_blueprint(
    data: bytes,
    *,
    source: str,
    limits: BlueprintLimits = BlueprintLimits(),  # noqa: B008 - frozen, safe to share
    expected_name: str | None = None,
) -> Blueprint:
    """Decode and validate one blueprint file; raise BlueprintInvalid listing every problem."""
    document, problems = decode(data, source, limits)
    if not problems:
        checker = Checker(limits, expected_name)
        blueprint = checker.check(document)
        problems = checker.problems
        if not problems and blueprint is not None:
            return blueprint
    raise BlueprintInvalid(source, problems)
