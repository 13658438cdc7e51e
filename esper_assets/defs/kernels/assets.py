"""The blueprint -> kernel assets, partitioned by blueprint name.

``blueprints`` reads each landed file, validates it and registers it in the
asset repository; its blocking check ``blueprint_is_valid`` stops kernels from
being built out of a bad file. ``compiled_kernels`` compiles what was registered
(never the same content twice), puts the kernel in the cache and registers it
with the blueprint version as its parent; its check ``kernel_round_trip`` reads
each kernel back from the cache and runs it.

Both assets take a single-run backfill policy, so a backfill of a thousand
blueprints is one run; every partition still gets its own metadata. Dagster's
input pointer for a partitioned upstream names the latest materialization of
*any* partition, so each kernel records the blueprint version it was built from
(its repository id and content hash) and a link to the run that registered it.

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
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import dagster as dg

from esper_assets.blueprints import BlueprintLimits
from esper_assets.defs._compat import DATA_VERSION_TAG, add_partition_metadata
from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    KernelCacheResource,
    LandingZoneResource,
)
from esper_assets.flows import kernels
from esper_assets.storage import AssetMetadata, AssetRepository

# Bump when the code below changes what a materialization would contain.
CODE_VERSION = "1"

# BackfillPolicy is marked beta in Dagster 1.13; it is what makes a backfill of many
# blueprints one run, so we use it on purpose and keep its notice out of every load.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)

blueprint_partitions = dg.DynamicPartitionsDefinition(name="blueprints")

BLUEPRINT_VALID = "blueprint_is_valid"
KERNEL_ROUND_TRIP = "kernel_round_trip"

# Both assets: one partition per blueprint name, a backfill is one run.
PARTITIONED = {
    "partitions_def": blueprint_partitions,
    "backfill_policy": dg.BackfillPolicy.single_run(),
    "code_version": CODE_VERSION,
    "group_name": "esper",
}


@dg.asset(
    **PARTITIONED,
    kinds={"python", "yaml"},
    check_specs=[
        dg.AssetCheckSpec(
            BLUEPRINT_VALID,
            asset="blueprints",
            blocking=True,
            description="The landed file parses, passes every rule and its parent is registered.",
        )  # fmt: skip
    ],
    description="Blueprint files from the landing zone, validated and registered (versioned, "
    "deduplicated by content hash) in the asset repository. Each partition's `content_hash` "
    "(the canonical document's sha256) is its data version; `file` is relative to the "
    "landing zone.",
)
def blueprints(
    context: dg.AssetExecutionContext,
    landing: LandingZoneResource,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> Iterator[dg.MaterializeResult]:
    names = context.partition_keys
    limits = blueprint_rules.limits()
    with repository.open() as repo:
        results = kernels.ingest_blueprints(
            repo, landing.open(), names, limits, actor=_actor(context)
        )
        chains = {r.name: lineage_in_repository(repo, r.asset_id) for r in results if r.asset_id}
    for result in results:
        add_partition_metadata(
            context, result.name, _blueprint_metadata(result, chains.get(result.name))
        )
    bad = [r for r in results if r.problems]
    for result in bad:
        context.log.error(f"{_file_of(result)}: " + "; ".join(result.problems))
    context.log.info(f"{len(results) - len(bad)} of {len(results)} blueprints registered")
    yield dg.MaterializeResult(
        data_version=_single_data_version([r.content_hash for r in results]),
        check_results=[_validity_check(results, bad, limits)],
    )


def _file_of(result: kernels.IngestedBlueprint) -> str:
    """The file relative to the landing zone, or what stood in for it."""
    return result.file or f"blueprints/ (no single file for {result.name!r})"


def _blueprint_metadata(
    result: kernels.IngestedBlueprint, chain: list[AssetMetadata] | None
) -> dict:
    """``chain``: the registered version and its ancestors (None if not registered)."""
    meta: dict = {
        "status": "invalid" if result.problems else "registered",
        "file": _file_of(result),
        "file_sha256": result.file_sha256,
        "content_hash": result.content_hash,
    }
    if result.problems:
        meta["problems"] = dg.MetadataValue.md("\n".join(f"- `{p}`" for p in result.problems))
    bp = result.blueprint
    if bp is not None:
        meta |= {
            "name": bp.name,
            "version": bp.version,
            "parent": bp.parent or "",
            "tags": ", ".join(bp.tags),
            "input_shape": str(list(bp.input_shape)),
            "output_shape": str(list(bp.output_shape)),
            "parameter_count": bp.parameter_count,
            "flops_per_sample": bp.flops_per_sample,
        }
    if result.asset_id and chain:  # registered: links walked in the repository
        meta |= {
            "parent": _parent_link(chain),
            "lineage": lineage_markdown(chain),
            "repository_id": result.asset_id,
            # the repository's version number: an ordinal, text so it is not plotted
            "repository_version": dg.MetadataValue.text(str(result.version_number)),
            "parent_repository_id": result.parent_asset_id or "",
            "new_in_repository": result.new,
        }
    return meta


# A check's lists name this many partitions; the rest are counted (each partition's
# own materialization has its outcome).
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


def _validity_check(results, bad, limits: BlueprintLimits) -> dg.AssetCheckResult:
    outcome = [
        f"- `{_file_of(r)}` ({r.name}): "
        + (
            "invalid: " + "; ".join(r.problems)
            if r.problems
            else f"valid, registered as {r.blueprint.name}@{r.blueprint.version} "
            f"(repository version {r.version_number}{', new' if r.new else ''})"
        )
        for r in results
    ]
    metadata: dict = {
        "partitions": _names(r.name for r in results),
        "files": dg.MetadataValue.md(_listed(outcome)),
        "rules": dg.MetadataValue.text(_validity_rules(limits)),
    }
    if not bad:
        return dg.AssetCheckResult(
            check_name=BLUEPRINT_VALID,
            passed=True,
            description=f"{len(results)} file(s) parsed, passed every rule and were registered",
            metadata=metadata,
        )
    lines = [f"{_file_of(r)}: {'; '.join(r.problems)}" for r in bad]
    return dg.AssetCheckResult(
        check_name=BLUEPRINT_VALID,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description="\n".join(lines)[:4000],
        metadata=metadata
        | {
            "invalid_partitions": _names(r.name for r in bad),
            "problems": dg.MetadataValue.md(_listed([f"- `{line}`" for line in lines])),
        },
    )


def _names(names) -> dg.TextMetadataValue:
    names = list(names)
    more = f", ... and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return dg.MetadataValue.text(", ".join(names[:LISTED]) + more)


def _listed(lines: list[str]) -> str:
    more = [f"- ... and {len(lines) - LISTED} more"] if len(lines) > LISTED else []
    return "\n".join(lines[:LISTED] + more)


@dg.asset(
    **PARTITIONED,
    kinds={"python", "numpy"},
    deps=[blueprints],
    check_specs=[
        dg.AssetCheckSpec(
            KERNEL_ROUND_TRIP,
            asset="compiled_kernels",
            description="Each kernel comes back from the cache with the registered checksum, "
            "loads, and its forward pass gives the documented output shape.",
        )  # fmt: skip
    ],
    description="Kernels compiled from registered blueprints, stored in the tiered kernel "
    "cache and registered with their blueprint version as parent, under their `kernel_id`. "
    "`blueprint_content_hash` is the data version of the blueprint partition the kernel was "
    "built from (its content hash); Dagster's own `input_data_version/blueprints` tag is a "
    "hash Dagster takes over the input partitions' data versions, so the two differ by "
    "design.",
)
def compiled_kernels(
    context: dg.AssetExecutionContext,
    repository: AssetRepositoryResource,
    kernel_cache: KernelCacheResource,
) -> Iterator[dg.MaterializeResult]:
    sources = _blueprint_sources(context)
    built: list[kernels.BuiltKernel] = []
    with repository.open() as repo, kernel_cache.open() as cache:
        for name in context.partition_keys:
            kernel = kernels.build_kernel(
                repo, cache, sources[name]["repository_id"], _actor(context)
            )  # the blueprint version's repository id
            chain = lineage_in_repository(repo, kernel.asset_id)
            add_partition_metadata(context, name, _kernel_metadata(kernel, sources[name], chain))
            built.append(kernel)
        failures = {k.name: kernels.verify_kernel(cache, k) for k in built}
    compiled = sum(k.compiled for k in built)
    context.log.info(f"{compiled} kernels compiled, {len(built) - compiled} reused")
    yield dg.MaterializeResult(
        data_version=_single_data_version([k.kernel_id for k in built]),
        check_results=[_round_trip_check(built, failures)],
    )


def _blueprint_sources(context: dg.AssetExecutionContext) -> dict[str, dict]:
    """The latest registered ``blueprints`` materialization of each partition in this run."""
    names = context.partition_keys
    sources = _latest_blueprints(context.instance, names, limit=max(len(names) * 4, 100))
    for name in set(names) - set(sources):  # re-materialized so often it fell off that page
        sources |= _latest_blueprints(context.instance, [name], limit=1)
    unusable = [n for n in names if sources.get(n, {}).get("status") != "registered"]
    if unusable:
        raise dg.Failure(
            description=f"no registered blueprint for partition(s) {', '.join(unusable)}: "
            "materialize `blueprints` for them and fix what its blueprint_is_valid check reports",
            metadata={"partitions": ", ".join(unusable)},
        )
    return sources


def _latest_blueprints(
    instance: dg.DagsterInstance, names: list[str], limit: int
) -> dict[str, dict]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=blueprints.key, asset_partitions=names), limit=limit
    ).records
    sources: dict[str, dict] = {}
    for record in records:  # newest first
        event = record.asset_materialization
        if event is None or event.partition in sources:
            continue
        meta = {k: v.value for k, v in event.metadata.items()}
        meta["run_id"] = record.run_id
        # The content hash is the partition's own data version; a run over several
        # partitions shares one Dagster data-version tag, so prefer the hash.
        meta["content_hash"] = meta.get("content_hash") or event.tags.get(DATA_VERSION_TAG)
        sources[event.partition] = meta
    return sources


def _kernel_metadata(kernel: kernels.BuiltKernel, source: dict, chain: list[AssetMetadata]) -> dict:
    return {
        "name": kernel.name,
        "version": source.get("version", ""),
        "parent": _parent_link(chain[1:]),  # its blueprint's parent
        "tags": source.get("tags", ""),
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
        "blueprint_content_hash": source["content_hash"],
        "blueprint_run": dg.MetadataValue.dagster_run(source["run_id"]),
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


def _round_trip_check(built, failures: dict[str, list[str]]) -> dg.AssetCheckResult:
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
    return dg.AssetCheckResult(
        check_name=KERNEL_ROUND_TRIP,
        passed=not bad,
        description="; ".join(f"{n}: {', '.join(p)}" for n, p in bad.items())[:4000]
        or f"{len(built)} kernel(s) read back from the cache, loaded and run",
        metadata=metadata,
    )


def _single_data_version(versions: list[str]) -> dg.DataVersion | None:
    # A run over several partitions shares one data version in Dagster; each
    # partition's own content hash is in its metadata instead.
    return dg.DataVersion(versions[0]) if len(versions) == 1 else None


def _actor(context: dg.AssetExecutionContext) -> str:
    return f"dagster:{context.run.run_id[:8]}"
