"""Lineage a person can follow in the UI: every example's kernel carries a ``lineage``
chain of links (kernel -> blueprint version -> parent versions -> root), read here the
way the UI reads it, through Dagster's GraphQL API against the code location that
``dagster dev -w workspace.yaml`` serves (a code server of its own), and checked step by
step (partition, version, repository id) against ``esper lineage`` (the chain it reads
out of Dagster's event log, and the repository's) and the repository itself. Every
link must point at a partition that exists and was materialized as that version."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.cli import main
from esper_assets.defs import build_definitions, local_instance
from esper_assets.flows.landing import DirectoryLanding
from esper_assets.runner import land_examples, tick_and_run
from esper_assets.settings import Settings
from esper_assets.storage import AssetRepository

pytestmark = pytest.mark.slow  # the 12 examples through the pipeline, a code server

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
EXAMPLES = sorted(path.name.split(".")[0] for path in example_blueprint_files())

ENTRIES = """label
  ... on MarkdownMetadataEntry { mdStr }
  ... on TextMetadataEntry { text }"""
# What the UI's asset partition page reads: the partition keys and each partition's
# materializations with their metadata.
QUERY = f"""
query Lineage($names: [String!]!) {{
  kernels: assetNodeOrError(assetKey: {{path: ["compiled_kernels"]}}) {{
    ... on AssetNode {{
      partitionKeys
      latestMaterializationByPartition(partitions: $names) {{
        partition
        metadataEntries {{ {ENTRIES} }}
      }}
    }}
  }}
  blueprints: assetNodeOrError(assetKey: {{path: ["blueprints"]}}) {{
    ... on AssetNode {{
      partitionKeys
      assetMaterializations {{
        partition
        metadataEntries {{ {ENTRIES} }}
      }}
    }}
  }}
}}
"""

# One step of a `lineage` entry: "2. blueprint [name@version](page) · repository id `id`"
STEP = re.compile(
    r"(?P<number>\d+)\. (?P<role>kernel|blueprint|parent) "
    r"\[(?P<name>[a-z0-9][a-z0-9_-]*)@(?P<version>[^\]\s]+)\]\((?P<url>[^)\s]+)\) "
    r"· repository id `(?P<id>[^`]+)`"
)
ROOT = re.compile(r"root: `(?P<name>[^@`]+)@(?P<version>[^`]+)`")


def entries(event: dict) -> dict[str, str]:
    return {e["label"]: e.get("mdStr", e.get("text")) for e in event["metadataEntries"]}


def page(url: str) -> tuple[str, str]:
    """The asset and partition a link points at; only the UI's partition page route."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.path.startswith("/assets/") and not parts.scheme and not parts.netloc, url
    assert query["view"] == ["partitions"] and len(query["partition"]) == 1, url
    return parts.path.removeprefix("/assets/"), query["partition"][0]


def chain_of(markdown: str) -> list[tuple[str, str, str, str]]:
    """(asset, partition, version, repository id) of every step, from the markdown alone;
    every line is a step, blank, or the closing root line."""
    steps, lines = [], [line for line in markdown.splitlines() if line.strip()]
    *step_lines, last = lines
    for number, line in enumerate(step_lines, start=1):
        step = STEP.fullmatch(line)
        assert step is not None and int(step["number"]) == number, line
        asset, partition = page(step["url"])
        assert partition == step["name"], line  # the link goes where its text says
        steps.append((asset, partition, step["version"], step["id"]))
    root = ROOT.fullmatch(last)
    assert root is not None, f"the chain does not end at its root: {last!r}"
    assert (root["name"], root["version"]) == steps[-1][1:3]
    return steps


def lineage_command(name: str) -> dict:
    result = CliRunner().invoke(main, ["lineage", name, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


@pytest.fixture
def examples_in_the_ui(esper_home) -> tuple[dict, dict]:
    """Every example through the pipeline, then what GraphQL answers about them."""
    settings = Settings.from_env()
    land_examples(DirectoryLanding(settings.landing))
    with local_instance(settings) as instance:
        report = tick_and_run(build_definitions(settings), instance)
        assert len(report.runs) == len(EXAMPLES) == 12
        assert all(r.success for r in report.runs), [r for r in report.runs if not r.success]
        with define_out_of_process_context(str(WORKSPACE), None, instance) as context:
            result = execute_dagster_graphql(context, QUERY, {"names": EXAMPLES})
    assert not result.errors, result.errors
    return result.data["kernels"], result.data["blueprints"]


def test_every_example_lineage_in_the_ui_agrees_with_esper_lineage_and_the_repository(
    examples_in_the_ui,
):
    kernels, blueprints = examples_in_the_ui
    latest = {e["partition"]: entries(e) for e in kernels["latestMaterializationByPartition"]}
    assert sorted(latest) == EXAMPLES
    # What each partition page lists: (asset, partition) -> the versions materialized there
    materialized: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for event in blueprints["assetMaterializations"]:
        meta = entries(event)
        key = ("blueprints", event["partition"])
        materialized.setdefault(key, set()).add((meta["version"], meta["repository_id"]))
    for name, meta in latest.items():
        materialized[("compiled_kernels", name)] = {(meta["version"], meta["kernel_id"])}
    partitions = {
        "compiled_kernels": set(kernels["partitionKeys"]),
        "blueprints": set(blueprints["partitionKeys"]),
    }
    latest_blueprint = {
        e["partition"]: entries(e) for e in reversed(blueprints["assetMaterializations"])
    }  # assetMaterializations is newest first

    lengths = {}
    with AssetRepository.from_env() as repo:
        for name in EXAMPLES:
            ui = chain_of(latest[name]["lineage"])
            # every link points at a partition that exists, materialized as that version
            for asset, partition, version, repository_id in ui:
                assert partition in partitions[asset], (name, asset, partition)
                assert (version, repository_id) in materialized[(asset, partition)], (name, ui)
            assert [step[0] for step in ui] == ["compiled_kernels"] + ["blueprints"] * (len(ui) - 1)
            steps = [step[1:] for step in ui]  # (partition, version, repository id)

            command = lineage_command(name)  # esper lineage NAME
            assert command["agree"] is True, command
            from_dagster = [(s["partition"], s["version"], s["repository_id"]) for s in command["dagster"]]  # fmt: skip
            from_repository = [(s["name"], s["version"], s["asset_id"]) for s in command["repository"]]  # fmt: skip
            assert steps == from_dagster, (name, steps, from_dagster)
            assert steps == from_repository, (name, steps, from_repository)

            kernel_id = latest[name]["kernel_id"]
            found = repo.get_lineage(kernel_id, depth=20)
            in_repository = [found["asset"], *found["ancestors"]]
            assert steps == [(m.name, m.version, m.asset_id) for m in in_repository], name
            assert found["ancestors"][-1].parent_id is None  # the root was reached

            # the blueprint's own entries: its chain, and a link to its parent's page
            blueprint = latest_blueprint[name]
            assert chain_of(blueprint["lineage"]) == ui[1:], name
            parent = re.fullmatch(r"\[[^\]]+\]\(([^)]+)\)", blueprint.get("parent") or "")
            if len(ui) > 2:
                assert parent is not None and page(parent[1]) == ui[2][:2], blueprint["parent"]
            else:
                assert not blueprint.get("parent"), blueprint["parent"]
            lengths[name] = len(ui)
    assert lengths["residual_mlp_ln_wide"] == 5  # kernel + 4 blueprint versions
    assert lengths["value_head"] == 4 and lengths["conv_classifier"] == 4
    assert lengths["mlp_base"] == 2 and lengths["token_mixer"] == 2
