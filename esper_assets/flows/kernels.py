"""The blueprint -> kernel pipeline, as plain functions over the storage layer.

Dagster assets call these; so do the CLI and the benchmark. Nothing here imports
Dagster. A blueprint is registered in the repository as its canonical document
without the name, so the repository's checksum *is* the blueprint's content hash:
the same content landed twice is one asset, and the same content under a new name
is caught as a copy. A kernel is registered with its blueprint as parent, and
its artifact is put into the kernel cache under a deterministic kernel id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from esper_assets.blueprints import (
    BLUEPRINT_SUFFIXES,
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    blueprint_name_for_file,
    compile_blueprint,
    kernel_id_for,
    load_kernel,
    parse_blueprint,
)
from esper_assets.blueprints.compiler import COMPILER_VERSION
from esper_assets.errors import AssetConflict, AssetNotFound, EsperError
from esper_assets.flows.landing import BLUEPRINTS, LandingZone
from esper_assets.storage import AssetMetadata, AssetQuery, AssetRepository, PersistentKernelCache

BLUEPRINT = "blueprint"
KERNEL = "kernel"


@dataclass
class IngestedBlueprint:
    """What happened to one landed blueprint file."""

    name: str
    source: str  # where the file was read from (the landing zone's own location)
    file_sha256: str = ""
    key: str = ""  # the file's name in the landing zone's blueprints/ ("" if not one file)
    blueprint: Blueprint | None = None
    problems: list[str] = field(default_factory=list)
    asset_id: str | None = None
    parent_asset_id: str | None = None
    version_number: int | None = None
    new: bool = False  # False: this content was registered before

    @property
    def valid(self) -> bool:
        return not self.problems and self.asset_id is not None

    @property
    def file(self) -> str:
        """The file relative to the landing zone (``blueprints/<key>``), the same for a
        directory and an S3 prefix; "" when there was not exactly one file."""
        return f"{BLUEPRINTS}/{self.key}" if self.key else ""

    @property
    def content_hash(self) -> str:
        return self.blueprint.content_hash if self.blueprint else self.file_sha256


@dataclass
class BuiltKernel:
    name: str
    kernel_id: str
    asset_id: str
    blueprint_asset_id: str
    compiled: bool  # False: an earlier compile of the same content was reused
    compile_ms: float
    parameter_count: int
    flops_per_sample: int
    size_bytes: int
    output_shape: tuple[int, ...]
    tiers: list[str]
    sha256: str  # of the artifact, as the repository records it


# -- blueprints ------------------------------------------------------------------------
def landed_files(landing: LandingZone) -> dict[str, list[str]]:
    """Blueprint name -> the landing-zone files that hold it (one listing for a whole run)."""
    files: dict[str, list[str]] = {}
    for landed in landing.list_blueprints():
        if landed.key.endswith(BLUEPRINT_SUFFIXES):
            files.setdefault(blueprint_name_for_file(landed.key), []).append(landed.key)
    return files


def read_blueprint(
    landing: LandingZone,
    name: str,
    keys: list[str],
    limits: BlueprintLimits | None = None,
) -> IngestedBlueprint:
    """Read and validate the landed blueprint ``name`` from ``keys`` (the files that hold
    it, which must be exactly one); content problems go in ``problems``."""
    if len(keys) != 1:
        found = f"{len(keys)} files ({', '.join(sorted(keys))})" if keys else "no file"
        return IngestedBlueprint(
            name, landing.location,
            problems=[f"{found} for blueprint {name!r} in {landing.location}; keep exactly one"],
        )  # fmt: skip
    data = landing.read(keys[0])
    result = IngestedBlueprint(
        name, f"{landing.location.rstrip('/')}/{keys[0]}", hashlib.sha256(data).hexdigest(),
        key=keys[0],
    )  # fmt: skip
    try:
        result.blueprint = parse_blueprint(
            data, source=keys[0], limits=limits or BlueprintLimits(), expected_name=name
        )
    except BlueprintInvalid as exc:
        result.problems = [str(p) for p in exc.problems]
    return result


def ingest_blueprints(
    repo: AssetRepository,
    landing: LandingZone,
    names: Iterable[str],
    limits: BlueprintLimits | None = None,
    actor: str = "esper",
) -> list[IngestedBlueprint]:
    """Read, validate and register landed blueprints, parents before children.

    Problems with a file's content come back in its ``problems`` and nothing of
    it is registered; the other files go on. Storage failures raise, because a
    retry may fix them.
    """
    files = landed_files(landing)
    results = [read_blueprint(landing, name, files.get(name, []), limits) for name in names]
    for result in topological(results):
        if not result.problems:
            register_blueprint(repo, result, actor)
    return results


def register_blueprint(
    repo: AssetRepository, result: IngestedBlueprint, actor: str = "esper"
) -> None:
    bp = result.blueprint
    assert bp is not None and not result.problems
    if bp.parent:
        result.parent_asset_id = find_blueprint(repo, bp.parent_name, bp.parent_version)
        if result.parent_asset_id is None:
            result.problems.append(
                f"parent: {bp.parent} is not registered; land {bp.parent_name} version "
                f"{bp.parent_version} first, or fix the reference"
            )
            return
    data = canonical_bytes(bp)
    checksum = hashlib.sha256(data).hexdigest()
    same = repo.search_assets(AssetQuery().with_type(BLUEPRINT).with_checksum(checksum))
    if same and same[0].name != bp.name:
        result.problems.append(
            f"(document): same content as blueprint {same[0].name!r} version {same[0].version} "
            f"(asset {same[0].asset_id}); a copy under a new name would compile to the same "
            "kernel. Change the content or drop the copy"
        )
        return
    try:
        result.asset_id = repo.create_asset(_blueprint_metadata(bp, result), data, actor)
    except AssetConflict as exc:
        result.problems.append(f"version: {exc}")
        return
    result.new = not same
    result.version_number = repo.get_metadata(result.asset_id).version_number


def canonical_bytes(bp: Blueprint) -> bytes:
    """The stored form: the canonical document without the name (sha256 == content hash)."""
    doc = bp.canonical()
    doc.pop("name", None)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _blueprint_metadata(bp: Blueprint, result: IngestedBlueprint) -> AssetMetadata:
    return AssetMetadata(
        asset_type=BLUEPRINT,
        name=bp.name,
        version=bp.version,
        parent_id=result.parent_asset_id,
        derived_from=[result.parent_asset_id] if result.parent_asset_id else [],
        tags=set(bp.tags),
        properties={
            "description": bp.description,
            "content_hash": bp.content_hash,
            "parent": bp.parent,
            "input_shape": list(bp.input_shape),
            "output_shape": list(bp.output_shape),
            "parameter_count": bp.parameter_count,
            "flops_per_sample": bp.flops_per_sample,
            "target": bp.target,
            "source": result.source,
            "source_sha256": result.file_sha256,
            "user": dict(bp.properties),
        },
    )


def find_blueprint(repo: AssetRepository, name: str, version: str) -> str | None:
    """The active registered blueprint ``name`` at semantic ``version``, if any."""
    query = AssetQuery().with_type(BLUEPRINT).with_name(name).order_by("version_number", False)
    for meta in repo.search_assets(query.limit(1000)):
        if meta.version == version and meta.state != "archived":
            return meta.asset_id
    return None


def has_registered_blueprint(repo: AssetRepository, name: str) -> bool:
    """Whether any version of blueprint ``name`` is in the repository, in any state."""
    query = AssetQuery().with_type(BLUEPRINT).with_name(name).include_expired()
    return bool(repo.search_assets(query.limit(1)))


def load_registered_blueprint(
    repo: AssetRepository, asset_id: str, limits: BlueprintLimits | None = None
) -> Blueprint:
    """Parse a registered blueprint again (the nightly re-validation and the check do this)."""
    meta, data = repo.get_asset(asset_id)
    doc = json.loads(data)
    doc["name"] = meta.name
    return parse_blueprint(
        json.dumps(doc).encode(), source=f"{meta.name}.json", limits=limits or BlueprintLimits(),
        expected_name=meta.name,
    )  # fmt: skip


# -- kernels ---------------------------------------------------------------------------
def build_kernel(
    repo: AssetRepository,
    cache: PersistentKernelCache,
    blueprint_asset_id: str,
    actor: str = "esper",
) -> BuiltKernel:
    """Compile a registered blueprint (unless this content was compiled before), put the
    kernel in the cache and register it with the blueprint as parent."""
    bp = load_registered_blueprint(repo, blueprint_asset_id)
    kernel_id = kernel_id_for(bp)
    earlier = find_kernel(repo, kernel_id)
    if earlier is not None:
        meta, artifact = repo.get_asset(earlier)
        compiled, compile_ms = False, meta.compilation_time_ms or 0.0
        props = meta.properties
        parameters, flops = props["parameter_count"], props["flops_per_sample"]
        output_shape = tuple(props["output_shape"])
        asset_id = earlier
    else:
        kernel = compile_blueprint(bp)
        artifact, compiled, compile_ms = kernel.artifact, True, kernel.compile_ms
        parameters, flops = kernel.parameter_count, kernel.flops_per_sample
        output_shape = kernel.output_shape
        asset_id = repo.create_asset(
            _kernel_metadata(bp, kernel_id, blueprint_asset_id, kernel), artifact, actor
        )
    tiers = cache.put(kernel_id, artifact, {"blueprint": bp.name, "version": bp.version})
    return BuiltKernel(
        bp.name, kernel_id, asset_id, blueprint_asset_id, compiled, compile_ms, parameters,
        flops, len(artifact), output_shape, tiers, hashlib.sha256(artifact).hexdigest(),
    )  # fmt: skip


def _kernel_metadata(
    bp: Blueprint, kernel_id: str, blueprint_asset_id: str, kernel
) -> AssetMetadata:
    return AssetMetadata(
        asset_type=KERNEL,
        asset_id=kernel_id,  # deterministic, so "compiled before?" is a key lookup
        name=bp.name,
        version=bp.version,
        parent_id=blueprint_asset_id,
        derived_from=[blueprint_asset_id],
        tags=set(bp.tags),
        compilation_time_ms=kernel.compile_ms,
        properties={
            "kernel_id": kernel_id,
            "content_hash": bp.content_hash,
            "compiler_version": COMPILER_VERSION,
            "target": kernel.target,
            "parameter_count": kernel.parameter_count,
            "flops_per_sample": kernel.flops_per_sample,
            "input_shape": list(kernel.input_shape),
            "output_shape": list(kernel.output_shape),
        },
    )


def find_kernel(repo: AssetRepository, kernel_id: str) -> str | None:
    """Kernels are registered under their kernel id, so this is a key lookup."""
    try:
        return repo.get_metadata(kernel_id).asset_id
    except AssetNotFound:
        return None


def verify_kernel(cache: PersistentKernelCache, built: BuiltKernel) -> list[str]:
    """Fetch the kernel back from the cache, load it and run it; return what is wrong."""
    data = cache.get(built.kernel_id)
    if data is None:
        return [f"kernel {built.kernel_id} is not in the cache"]
    problems = []
    if hashlib.sha256(data).hexdigest() != built.sha256:
        problems.append("the cached bytes differ from the registered artifact")
    try:
        kernel = load_kernel(data)
        import numpy as np

        x = np.zeros((2, *kernel.input_shape), dtype=np.float32)
        y = kernel.forward(x)
        if tuple(y.shape) != (2, *built.output_shape):
            problems.append(
                f"forward gave shape {list(y.shape)}, expected {[2, *built.output_shape]}"
            )
        elif not np.isfinite(y).all():
            problems.append("forward gave non-finite values")
    except EsperError as exc:
        problems.append(f"kernel does not load or run: {exc}")
    return problems


# -- registered assets -----------------------------------------------------------------
def registered_blueprints(repo: AssetRepository, page: int = 1000) -> Iterable[AssetMetadata]:
    """Every active registered blueprint version, oldest first."""
    query = AssetQuery().with_type(BLUEPRINT).with_state("active").order_by("created_at")
    offset = 0
    while batch := repo.search_assets(query.limit(page).offset(offset)):
        yield from batch
        offset += len(batch)


def registered_kernels(repo: AssetRepository, limit: int = 1000) -> list[AssetMetadata]:
    """Active registered kernels, up to ``limit``."""
    return repo.search_assets(AssetQuery().with_type(KERNEL).with_state("active").limit(limit))


# -- lineage ---------------------------------------------------------------------------
def latest_asset(repo: AssetRepository, asset_type: str, name: str) -> AssetMetadata | None:
    query = AssetQuery().with_type(asset_type).with_name(name).order_by("version_number", False)
    found = repo.search_assets(query.limit(1))
    return found[0] if found else None


def lineage_chain(repo: AssetRepository, name: str, depth: int = 20) -> list[AssetMetadata]:
    """The newest kernel named ``name``, then its blueprint, then that blueprint's parents."""
    kernel = latest_asset(repo, KERNEL, name)
    if kernel is None:
        raise AssetNotFound(
            f"no kernel named {name!r} is registered; run the pipeline for it first"
        )
    return [kernel, *repo.get_lineage(kernel.asset_id, depth=depth)["ancestors"]]


def checkpoint_lineage(
    repo: AssetRepository, run_id: str, step: int | None = None, depth: int = 20
) -> tuple[AssetMetadata, list[list[AssetMetadata]]]:
    """The checkpoint of ``run_id`` at ``step`` (default: its newest), and for each
    kernel it was derived from, that kernel's chain (kernel -> blueprint -> parents)."""
    query = AssetQuery().with_type("checkpoint").with_name(run_id)
    found = [m for m in repo.search_assets(query) if step in (None, m.properties.get("step"))]
    if not found:
        at = "" if step is None else f" at step {step}"
        raise AssetNotFound(f"no checkpoint of run {run_id!r}{at} is registered")
    checkpoint = max(found, key=lambda m: m.properties.get("step", -1))
    chains = []
    for kernel_id in checkpoint.derived_from:
        kernel = repo.get_metadata(kernel_id)
        chains.append([kernel, *repo.get_lineage(kernel_id, depth=depth)["ancestors"]])
    return checkpoint, chains


def describe(meta: AssetMetadata) -> dict[str, Any]:
    props = meta.properties
    return {
        "type": meta.asset_type,
        "name": meta.name,
        "version": meta.version,
        "asset_id": meta.asset_id,
        "kernel_id": props.get("kernel_id"),
        "content_hash": props.get("content_hash"),
    }


def topological(blueprints: Iterable[IngestedBlueprint]) -> list[IngestedBlueprint]:
    """Parents before children (for batches that hold both)."""
    items = list(blueprints)
    by_ref = {f"{b.blueprint.name}@{b.blueprint.version}": b for b in items if b.blueprint}
    done: set[int] = set()
    ordered: list[IngestedBlueprint] = []

    def visit(item: IngestedBlueprint) -> None:
        if id(item) in done:
            return
        done.add(id(item))
        parent = (
            by_ref.get(item.blueprint.parent) if item.blueprint and item.blueprint.parent else None
        )
        if parent is not None:
            visit(parent)
        ordered.append(item)

    for item in items:
        visit(item)
    return ordered


__all__ = [
    "BuiltKernel",
    "IngestedBlueprint",
    "build_kernel",
    "find_blueprint",
    "find_kernel",
    "has_registered_blueprint",
    "ingest_blueprints",
    "lineage_chain",
    "verify_kernel",
]
