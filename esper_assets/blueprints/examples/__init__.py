"""Example blueprints shipped as package data (used by the demo, tests and docs).

Derivation chains: mlp_base -> residual_mlp -> residual_mlp_ln -> residual_mlp_ln_wide,
conv_stem -> conv_block -> conv_classifier, mlp_base -> policy_head -> value_head.
"""

from __future__ import annotations

from pathlib import Path

from esper_assets.blueprints.spec import BLUEPRINT_SUFFIXES

EXAMPLES_DIR = Path(__file__).resolve().parent


def example_blueprint_files() -> list[Path]:
    """Every shipped example blueprint file, sorted by name."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix in BLUEPRINT_SUFFIXES)
