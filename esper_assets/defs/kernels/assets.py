"""The blueprint -> kernel assets, partitioned by blueprint name, in one step.

``blueprints`` reads each landed file, validates it and registers it in the asset
repository; ``compiled_kernels`` compiles what was registered (never the same content
twice), puts the kernel in the cache and registers it with the blueprint version as its
parent. Both are one ``multi_asset`` step (``blueprints_and_kernels``), so a run
materializes either or both, for one partition (the sensor's run per landed file) or
for many (a backfill is one run: single-run backfill policy).

Per-partition truth. Dagster keeps one data version per asset per step and writes the
same tags on every partition a step materializes (dagster-io/dagster#18649), and a
check result has no partition unless its spec is partitioned (a preview feature in
Dagster 1.13, so not used). So the step reports each partition itself, whatever the
run's size:

- one ``AssetMaterialization`` per partition with its own data version (a blueprint's
  content hash, a kernel's id), the asset's code version and, for a kernel, the data
  version and event of the blueprint partition it was built from (the tags Dagster's
  own staleness reads: ``_compat.data_version_tags``). Unchanged content is never
  stale; changed content always is.
- an invalid file gets no materialization at all, and no kernel is built from it.
- one ``AssetCheckEvaluation`` per partition (``partition`` set: the UI's check
  history and GraphQL show each partition's outcome), then one for the run as a whole
  (no partition: the run's summary, which the asset's check status shows).
- ``blueprint_is_valid`` is blocking: a failed one fails the step after the valid
  partitions were materialized and their kernels built; within the step, a kernel is
  built only from a blueprint that passed.

Lineage a person can click through: each kernel's and each blueprint's ``lineage`` is
a markdown chain down to the root blueprint, every step a link to that blueprint
partition's page in the UI with its version and repository id as text, walked in the
repository (the same walk and depth as ``esper lineage``); a blueprint's ``parent`` is a
link to its parent's partition page.

Metadata is written for a person reading it in the UI: ids and hashes are text
(Dagster plots numbers), measurements carry their unit in their name, files are
named relative to the landing zone, and each check says what it checked, how,
and what was wrong.
"""

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import dagster as dg

from esper_assets.blueprints import BlueprintLimits
from esper_assets.defs._compat import data_version_tags
from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    KernelCacheResource,
    LandingZoneResource,
)
from esper_assets.flows import kernels
from esper_assets.storage import AssetMetadata, AssetRepository, PersistentKernelCache

# Bump when the code below changes what a materialization would contain.
CODE_VERSION = "2"

# BackfillPolicy is marked beta in Dagster 1.13; it is what makes a backfill of many
# blueprints one run, so we use it on purpose and keep its notice out of every load.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)

blueprint_partitions = dg.DynamicPartitionsDefinition(name="blueprints")

BLUEPRINTS = dg.AssetKey("blueprints")
KERNELS = dg.AssetKey("compiled_kernels")
BLUEPRINT_VALID = "blueprint_is_valid"
KERNEL_ROUND_TRIP = "kernel_round_trip"
VALIDITY = dg.AssetCheckKey(BLUEPRINTS, BLUEPRINT_VALID)
ROUND_TRIP = dg.AssetCheckKey(KERNELS, KERNEL_ROUND_TRIP)


@dg.multi_asset(
    name="blueprints_and_kernels",
    specs=[
        dg.AssetSpec(
            BLUEPRINTS,
            kinds={"python", "yaml"},
            code_version=CODE_VERSION,
            skippable=True,  # an invalid file is not materialized
            description="Blueprint files from the landing zone, validated and registered "
            "(versioned, deduplicated by content hash) in the asset repository. Each "
            "partition's data version is its `content_hash` (the canonical document's "
            "sha256); `file` is relative to the landing zone. An invalid file is not "
            "materialized: its `blueprint_is_valid` evaluation (for that partition) says why.",
        ),
        dg.AssetSpec(
            KERNELS,
            deps=[BLUEPRINTS],
            kinds={"python", "numpy"},
            code_version=CODE_VERSION,
            skippable=True,
            description="Kernels compiled from registered blueprints, stored in the tiered "
            "kernel cache and registered with their blueprint version as parent. Each "
            "partition's data version is its `kernel_id`; its input data version is the "
            "data version (content hash) of the blueprint partition it was built from.",
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            BLUEPRINT_VALID,
            asset=BLUEPRINTS,
            blocking=True,
            description="The landed file parses, passes every rule and its parent is "
            "registered. One evaluation per partition, and one for each run as a whole.",
        ),
        dg.AssetCheckSpec(
            KERNEL_ROUND_TRIP,
            asset=KERNELS,
            description="Each kernel comes back from the cache with the registered checksum, "
            "loads, and its forward pass gives the documented output shape. One evaluation "
            "per partition, and one for each run as a whole.",
        ),
    ],
    partitions_def=blueprint_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    can_subset=True,
    group_name="esper",
)
def blueprints_and_kernels(
    context: dg.AssetExecutionContext,
    landing: LandingZoneResource,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
    kernel_cache: KernelCacheResource,
) -> Iterator:
    names = context.partition_keys
    selected = context.selected_asset_keys
    with repository.open() as repo:
        refused: set[str] = set()
        if BLUEPRINTS in selected:
            ingested = yield from _register_blueprints(
                context, repo, landing, blueprint_rules.limits(), names
            )
            refused = {r.name for r in ingested if not r.valid}
        if KERNELS in selected:
            with kernel_cache.open() as cache:
                yield from _build_kernels(context, repo, cache, names, refused)


# -- blueprints ----------------------------------------------------------------------------
def _register_blueprints(
    context: dg.AssetExecutionContext,
    repo: AssetRepository,
    landing: LandingZoneResource,
    limits: BlueprintLimits,
    names: list[str],
) -> Iterator:
    """Materialize each valid file's partition and evaluate each file; returns what was
    ingested (``yield from`` hands it back)."""
    results = kernels.ingest_blueprints(repo, landing.open(), names, limits, _actor(context))
    checked = VALIDITY in context.selected_asset_check_keys
    for result in results:
        if result.valid:
            chain = lineage_in_repository(repo, result.asset_id)
            yield dg.AssetMaterialization(
                asset_key=BLUEPRINTS,
                partition=result.name,
                metadata=_blueprint_metadata(result, chain),
                tags=data_version_tags(result.content_hash, CODE_VERSION),
            )
        else:
            context.log.error(f"{_file_of(result)}: " + "; ".join(result.problems))
        if checked:
            yield _validity_of(result)
    bad = [r for r in results if not r.valid]
    context.log.info(f"{len(results) - len(bad)} of {len(results)} blueprints registered")
    if checked:
        yield _validity_check(results, bad, limits)
    return results


def _file_of(result: kernels.IngestedBlueprint) -> str:
    """The file relative to the landing zone, or what stood in for it."""
    return result.file or f"blueprints/ (no single file for {result.name!r})"


def _blueprint_metadata(result: kernels.IngestedBlueprint, chain: list[AssetMetadata]) -> dict:
    """A registered blueprint's metadata; ``chain``: its version and its ancestors."""
    bp = result.blueprint
    return {
        "file": _file_of(result),
        "file_sha256": result.file_sha256,
        "content_hash": result.content_hash,
        "name": bp.name,
        "version": bp.version,
        "tags": ", ".join(bp.tags),
        "input_shape": str(list(bp.input_shape)),
        "output_shape": str(list(bp.output_shape)),
        "parameter_count": bp.parameter_count,
        "flops_per_sample": bp.flops_per_sample,
        # links walked in the repository
        "parent": _parent_link(chain),
        "lineage": lineage_markdown(chain),
        "repository_id": result.asset_id,
        # the repository's version number: an ordinal, text so it is not plotted
        "repository_version": dg.MetadataValue.text(str(result.version_number)),
        "parent_repository_id": result.parent_asset_id or "",
        "new_in_repository": result.new,
    }


# A check's lists name this many partitions; the rest are counted (each partition's
# own evaluation has its outcome).
LISTED = 100


def _validity_rules(limits: BlueprintLimits) -> str:
    return (
        "parsed (JSON or YAML; the blueprint schema: name equal to the file name, semantic "
        "version, input shape, known ops, layer shapes that fit together); within the "
        f"limits: file <= {limits.max_file_bytes:,} bytes, <= {limits.max_layers:,} layers, "
        f"<= {limits.max_parameters:,} parameters, every dimension <= "
        f"{limits.max_dimension:,}, <= {limits.max_activation_elements:,} activation elements "
        "per sample; parent registered in the repository; not another blueprint's content "
        "under a new name; version not registered with other content"
    )


def _outcome(result: kernels.IngestedBlueprint) -> str:
    if not result.valid:
        return "invalid: " + "; ".join(result.problems)
    bp = result.blueprint
    new = ", new" if result.new else ""
    return f"valid, registered as {bp.name}@{bp.version} (repository version {result.version_number}{new})"


def _validity_of(result: kernels.IngestedBlueprint) -> dg.AssetCheckEvaluation:
    """One partition's evaluation: its file and what was wrong with it, if anything."""
    metadata: dict = {"file": _file_of(result)}
    if result.problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- `{p}`" for p in result.problems))
    return _evaluation(
        VALIDITY, result.valid, f"{_file_of(result)}: {_outcome(result)}", metadata, result.name
    )


def _validity_check(results, bad, limits: BlueprintLimits) -> dg.AssetCheckEvaluation:
    """The run's evaluation over all its partitions."""
    outcome = [f"- `{_file_of(r)}` ({r.name}): {_outcome(r)}" for r in results]
    metadata: dict = {
        "partitions": _names(r.name for r in results),
        "files": dg.MetadataValue.md(_listed(outcome)),
        "rules": dg.MetadataValue.text(_validity_rules(limits)),
    }
    if not bad:
        description = f"{len(results)} file(s) parsed, passed every rule and were registered"
        return _evaluation(VALIDITY, True, description, metadata)
    lines = [f"{_file_of(r)}: {'; '.join(r.problems)}" for r in bad]
    metadata |= {
        "invalid_partitions": _names(r.name for r in bad),
        "problems": dg.MetadataValue.md(_listed([f"- `{line}`" for line in lines])),
    }
    return _evaluation(VALIDITY, False, "\n".join(lines), metadata)


def _evaluation(
    key: dg.AssetCheckKey,
    passed: bool,
    description: str,
    metadata: dict,
    partition: str | None = None,
) -> dg.AssetCheckEvaluation:
    """An evaluation of ``key`` for one partition (or, without one, for the whole run).
    Failures are ERROR; a failed blocking check fails the step once it has finished."""
    return dg.AssetCheckEvaluation(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=passed,
        partition=partition,
        metadata=metadata,
        description=description[:4000],
        severity=dg.AssetCheckSeverity.ERROR,
        blocking=key == VALIDITY,
    )


def _names(names: Iterable[str]) -> dg.TextMetadataValue:
    names = list(names)
    more = f", ... and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return dg.MetadataValue.text(", ".join(names[:LISTED]) + more)


def _listed(lines: list[str]) -> str:
    more = [f"- ... and {len(lines) - LISTED} more"] if len(lines) > LISTED else []
    return "\n".join(lines[:LISTED] + more)


# -- kernels -------------------------------------------------------------------------------
def _build_kernels(
    context: dg.AssetExecutionContext,
    repo: AssetRepository,
    cache: PersistentKernelCache,
    names: list[str],
    refused: set[str],
) -> Iterator:
    """Build each partition's kernel from its latest registered blueprint, except those
    whose file this step refused; then read each back (the round-trip check)."""
    sources = _blueprint_sources(context.instance, [n for n in names if n not in refused])
    checked = ROUND_TRIP in context.selected_asset_check_keys
    built, failures = [], {}
    for name in names:
        source = sources.get(name)
        if source is None:
            continue
        kernel = kernels.build_kernel(repo, cache, source.repository_id, _actor(context))
        chain = lineage_in_repository(repo, kernel.asset_id)
        yield dg.AssetMaterialization(
            asset_key=KERNELS,
            partition=name,
            metadata=_kernel_metadata(kernel, source, chain),
            tags=data_version_tags(
                kernel.kernel_id,
                CODE_VERSION,
                inputs={BLUEPRINTS: (source.content_hash, source.storage_id)},
            ),
        )
        built.append(kernel)
        failures[name] = kernels.verify_kernel(cache, kernel)
        if checked:
            yield _round_trip_of(kernel, failures[name])
    compiled = sum(k.compiled for k in built)
    context.log.info(f"{compiled} kernels compiled, {len(built) - compiled} reused")
    if checked and built:
        yield _round_trip_check(built, failures)
    _refuse_unbuilt(context, names, refused, sources)


def _refuse_unbuilt(context, names: list[str], refused: set[str], sources: dict) -> None:
    """Fail the step for partitions asked for that have no registered blueprint (a file
    refused in this step is reported by its failed blocking check instead)."""
    unusable = [n for n in names if n not in sources and n not in refused]
    if refused:
        context.log.info(f"no kernel built for refused file(s): {', '.join(sorted(refused))}")
    if unusable:
        raise dg.Failure(
            description=f"no registered blueprint for partition(s) {', '.join(unusable)}: "
            "materialize `blueprints` for them and fix what its blueprint_is_valid check reports",
            metadata={"partitions": ", ".join(unusable)},
        )


@dataclass(frozen=True)
class BlueprintSource:
    """The ``blueprints`` materialization a kernel is built from."""

    partition: str
    repository_id: str
    content_hash: str  # the partition's data version
    storage_id: int  # the event's id in Dagster's event log (the kernel's input pointer)
    run_id: str
    version: str
    tags: str


def _blueprint_sources(
    instance: dg.DagsterInstance, names: list[str]
) -> dict[str, BlueprintSource]:
    """The latest registered ``blueprints`` materialization of each of ``names``."""
    sources = _latest_blueprints(instance, names, limit=max(len(names) * 4, 100))
    for name in set(names) - set(sources):  # re-materialized so often it fell off that page
        sources |= _latest_blueprints(instance, [name], limit=1)
    return sources


def _latest_blueprints(
    instance: dg.DagsterInstance, names: list[str], limit: int
) -> dict[str, BlueprintSource]:
    if not names:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=BLUEPRINTS, asset_partitions=names), limit=limit
    ).records
    sources: dict[str, BlueprintSource] = {}
    for record in records:  # newest first
        event = record.asset_materialization
        if event is None or event.partition in sources:
            continue
        meta = {k: v.value for k, v in event.metadata.items()}
        if not meta.get("repository_id") or meta.get("status") == "invalid":
            continue  # (an invalid file was materialized by code version 1)
        sources[event.partition] = BlueprintSource(
            partition=event.partition,
            repository_id=meta["repository_id"],
            content_hash=meta.get("content_hash", ""),
            storage_id=record.storage_id,
            run_id=record.run_id,
            version=meta.get("version", ""),
            tags=meta.get("tags", ""),
        )
    return sources


def _kernel_metadata(
    kernel: kernels.BuiltKernel, source: BlueprintSource, chain: list[AssetMetadata]
) -> dict:
    return {
        "name": kernel.name,
        "version": source.version,
        "parent": _parent_link(chain[1:]),  # its blueprint's parent
        "tags": source.tags,
        "kernel_id": kernel.kernel_id,  # also its repository id
        "compiled": kernel.compiled,
        "parameter_count": kernel.parameter_count,
        "flops_per_sample": kernel.flops_per_sample,
        "compile_ms": dg.MetadataValue.float(round(kernel.compile_ms, 3)),
        "size_bytes": kernel.size_bytes,
        "output_shape": str(list(kernel.output_shape)),
        "tiers_written": ", ".join(kernel.tiers),
        # the blueprint version it was built from (partition: ``name``)
        "blueprint_repository_id": kernel.blueprint_asset_id,
        "blueprint_content_hash": source.content_hash,
        "blueprint_run": dg.MetadataValue.dagster_run(source.run_id),
        "lineage": lineage_markdown(chain),
    }


# -- lineage -----------------------------------------------------------------------------
# Ancestors walked per kernel or blueprint: the depth `esper lineage` walks.
LINEAGE_DEPTH = 20


def lineage_in_repository(repo: AssetRepository, asset_id: str) -> list[AssetMetadata]:
    """``asset_id`` (a kernel or a blueprint version), then its ancestors nearest first,
    as the repository records them: up to ``LINEAGE_DEPTH`` of them."""
    return repo.get_ancestry(asset_id, depth=LINEAGE_DEPTH)


def partition_page(asset: str, partition: str) -> str:
    """The Dagster UI's page of one partition of ``asset``, relative to the UI's root
    (the route the UI itself links to: ``/assets/<key>?view=partitions&partition=<p>``).
    A webserver started with ``--path-prefix`` serves it under that prefix."""
    query = urlencode({"view": "partitions", "partition": partition}, quote_via=quote)
    return f"/assets/{quote(asset, safe='')}?{query}"


def _step(meta: AssetMetadata) -> str:
    # a kernel is a partition of compiled_kernels, a blueprint version one of blueprints,
    # both under their name
    asset = "compiled_kernels" if meta.asset_type == kernels.KERNEL else "blueprints"
    return (
        f"[{meta.name}@{meta.version}]({partition_page(asset, meta.name)}) "
        f"· repository id `{meta.asset_id}`"
    )


def lineage_markdown(chain: list[AssetMetadata]) -> dg.MarkdownMetadataValue:
    """The chain kernel -> blueprint version -> parent versions -> root as a numbered
    list of links; the last line says whether the root was reached."""
    lines = []
    for number, meta in enumerate(chain, start=1):
        if meta.asset_type == kernels.KERNEL:
            role = "kernel"
        elif number == 1 or chain[number - 2].asset_type == kernels.KERNEL:
            role = "blueprint"
        else:
            role = "parent"
        lines.append(f"{number}. {role} {_step(meta)}")
    if chain[-1].parent_id:
        lines.append(
            f"\n(cut at {LINEAGE_DEPTH} ancestors: `{chain[-1].name}` has a parent, "
            f"repository id `{chain[-1].parent_id}`)"
        )
    else:
        lines.append(f"\nroot: `{chain[-1].name}@{chain[-1].version}`")
    return dg.MetadataValue.md("\n".join(lines))


def _parent_link(chain: list[AssetMetadata]) -> dg.MetadataValue | str:
    """A link to the parent version's partition page ("" for a root): ``chain`` starts
    at the blueprint version whose parent it is."""
    if len(chain) < 2:
        return ""
    parent = chain[1]
    return dg.MetadataValue.md(
        f"[{parent.name}@{parent.version}]({partition_page('blueprints', parent.name)})"
    )


ROUND_TRIP_STEPS = (
    "fetched from the kernel cache; sha256 equal to the artifact registered in the "
    "repository; loads; a forward pass over a batch of 2 zero inputs gives shape "
    "(2, *output_shape) and finite values"
)


def _round_trip_of(kernel: kernels.BuiltKernel, problems: list[str]) -> dg.AssetCheckEvaluation:
    """One kernel partition's evaluation."""
    outcome = f"failed: {'; '.join(problems)}" if problems else "passed"
    metadata = {"kernel_id": kernel.kernel_id, "steps": dg.MetadataValue.text(ROUND_TRIP_STEPS)}
    return _evaluation(
        ROUND_TRIP, not problems, f"`{kernel.kernel_id}` {outcome}", metadata, kernel.name
    )


def _round_trip_check(built, failures: dict[str, list[str]]) -> dg.AssetCheckEvaluation:
    """The run's evaluation over all the kernels it built."""
    bad = {name: problems for name, problems in failures.items() if problems}
    outcome = [
        f"- {k.name}: `{k.kernel_id}` "
        + (f"failed: {'; '.join(bad[k.name])}" if k.name in bad else "passed")
        for k in built
    ]
    metadata: dict = {
        "partitions": _names(k.name for k in built),
        "kernels": dg.MetadataValue.md(_listed(outcome)),
        "steps": dg.MetadataValue.text(ROUND_TRIP_STEPS),
    }
    if bad:
        metadata["failed_partitions"] = _names(bad)
        metadata["problems"] = dg.MetadataValue.md(
            _listed([f"- {n}: {'; '.join(p)}" for n, p in bad.items()])
        )
    description = "; ".join(f"{n}: {', '.join(p)}" for n, p in bad.items()) or (
        f"{len(built)} kernel(s) read back from the cache, loaded and run"
    )
    return _evaluation(ROUND_TRIP, not bad, description, metadata)


def _actor(context: dg.AssetExecutionContext) -> str:
    return f"dagster:{context.run.run_id[:8]}"
