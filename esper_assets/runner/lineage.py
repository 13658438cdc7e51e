"""What the pipeline's runs recorded, read back from Dagster's event log alone:
``dagster_lineage`` follows a kernel's chain of materializations (each step names
the repository id of the one it was built from), so ``esper lineage`` and the demo
can compare it with the repository's own lineage. A kernel is registered under its
kernel id, so its materialization records that alone (``kernel_id``); the chain
gives every step its ``repository_id``.

A blueprint's ``parent`` is a link to its parent's partition page in the UI (older
materializations: the text ``name@version``); the walk follows it to that partition
and takes the materialization there that has the recorded ``parent_repository_id``, so
a link to the wrong partition ends the chain early and the comparison fails."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import dagster as dg


def dagster_lineage(instance: dg.DagsterInstance, name: str, depth: int = 20) -> list[dict]:
    """The chain kernel -> blueprint version -> parent blueprints, read from Dagster's
    event log alone: each step is the materialization whose recorded repository id the
    previous step names."""
    kernel = materialization_of(instance, "compiled_kernels", name, id_field="kernel_id")
    if kernel is None:
        return []
    chain = [{"type": "kernel", **kernel, "repository_id": kernel["kernel_id"]}]
    # the kernel's partition is its blueprint's: the same name
    partition, wanted = name, kernel["blueprint_repository_id"]
    while partition and len(chain) <= depth:
        found = materialization_of(instance, "blueprints", partition, wanted)
        if found is None:
            break
        chain.append({"type": "blueprint", **found})
        partition = parent_partition(found.get("parent") or "")
        wanted = found.get("parent_repository_id")
    return chain


# A markdown link: [label](target)
_LINK = re.compile(r"\A\[[^\]]*\]\(([^)\s]+)\)\Z")


def parent_partition(parent: str) -> str:
    """The partition a blueprint's recorded ``parent`` names: the ``partition`` of the
    page its link points at, or (recorded as text) the name before ``@``."""
    link = _LINK.match(parent.strip())
    if link is None:
        return parent.partition("@")[0]
    return parse_qs(urlsplit(link.group(1)).query).get("partition", [""])[0]


# Older materializations of a partition are read a page at a time, newest first.
_PAGE = 100


def materialization_of(
    instance: dg.DagsterInstance,
    asset: str,
    partition: str,
    repository_id: str | None = None,
    id_field: str = "repository_id",
) -> dict | None:
    """The newest materialization of ``asset[partition]`` whose metadata names a
    repository id in ``id_field`` (``repository_id`` itself, if given). Usually that is
    the latest one, fetched alone; else older ones are paged through, however many
    times the partition was materialized since."""

    def found(record) -> dict | None:
        event = record.asset_materialization
        meta = {k: v.value for k, v in event.metadata.items()} if event else {}
        if (
            event
            and event.partition == partition
            and meta.get(id_field)
            and (repository_id in (None, meta[id_field]))
        ):
            return {"partition": partition, "run_id": record.run_id, **meta}
        return None

    key = dg.AssetKey(asset)
    records_filter = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition])
    cursor, limit = None, 1
    while True:
        page = instance.fetch_materializations(records_filter, limit=limit, cursor=cursor)
        for record in page.records:  # newest first
            if (hit := found(record)) is not None:
                return hit
        if not page.has_more:
            return None
        cursor, limit = page.cursor, _PAGE
