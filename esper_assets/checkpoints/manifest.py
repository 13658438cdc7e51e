"""The checkpoint manifest: what one saved (run, step) is made of, as versioned JSON.

``{"format": "esper-checkpoint", "version": 2, "run", "step", "created_at",
"kernels", "metrics", "logical_bytes", "stored_bytes", "chunk_count", "new_chunks",
"components": {name: {"kind", "files": [{"path", "size", "digest", "chunks":
[[address, size], ...], "tensors": [{"name", "dtype", "shape", "start", "end"}],
"metadata"}]}}}``. A file's bytes are its chunks in order; a tensor's byte range
is relative to the start of its file. The manifest is the asset's content in the
repository and is written after every chunk it names (see ``store``).

A file's ``digest`` is the blake3 of its chunk list (:func:`digest_of`): a hash tree
of two levels, as each chunk's address is the blake3 of its bytes. It names the
file's bytes as surely as a hash of the whole file, costs nothing to compute on
save (a second pass over every byte cost a third of the save's CPU), and a restore
that verifies every chunk verifies the file by recomputing it. Version 1 manifests
(``blake3``: a hash of the whole file) are still read; restore re-hashes those files.

Also the rules on names (run ids, component names, file names), written once.

May import: ``esper_assets.errors``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from esper_assets.errors import InvalidCheckpoint, InvalidInput

FORMAT, VERSION = "esper-checkpoint", 2
READABLE_VERSIONS = (1, 2)
MAX_NAME = 128


def check_name(what: str, value: object) -> str:
    """A run id, component or file name: printable, 1..128 characters, no '/', not
    '.' or '..' (they become path parts on restore)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_NAME
        or not value.isprintable()
        or "/" in value
        or "\\" in value
        or value in (".", "..")
    ):
        raise InvalidInput(
            f"{what} must be printable text of 1..{MAX_NAME} characters without '/', "
            f"got {value!r:.80}"
        )
    return value


def check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidInput(f"step must be a non-negative integer, got {step!r:.40}")
    return step


def version_label(step: int) -> str:
    return f"step-{step}"


def new_manifest(
    run_id: str, step: int, components: dict[str, dict], kernels: list[str], metrics: dict
) -> dict[str, Any]:
    files = [f for c in components.values() for f in c["files"]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": run_id,
        "step": step,
        "created_at": datetime.now(UTC).isoformat(),
        "kernels": sorted(set(kernels)),
        "metrics": metrics,
        "logical_bytes": sum(f["size"] for f in files),
        "stored_bytes": sum(f.pop("stored_bytes") for f in files),
        "chunk_count": sum(len(f["chunks"]) for f in files),
        "new_chunks": sum(f.pop("new_chunks") for f in files),
        "components": components,
    }


def digest_of(chunks: list[list]) -> str:
    """The blake3 of a file's ordered (address, size) chunk list."""
    import blake3

    hasher = blake3.blake3()
    for address, size in chunks:
        hasher.update(bytes.fromhex(address) + size.to_bytes(8, "little"))
    return hasher.hexdigest()


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def decode(data: bytes, what: str) -> dict[str, Any]:
    """A stored manifest, checked enough that restore can trust its shape."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise InvalidCheckpoint(f"{what}: the manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{what}: not an esper checkpoint manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise InvalidCheckpoint(
            f"{what}: manifest version {manifest.get('version')!r} is not one of "
            f"{READABLE_VERSIONS}; upgrade esper_assets to read it"
        )
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        raise InvalidCheckpoint(f"{what}: the manifest names no components")
    for name, component in components.items():
        check_name("component", name)
        for entry in component.get("files", []) if isinstance(component, dict) else [None]:
            _check_file(entry, f"{what}, component {name!r}")
    return manifest


def _check_file(entry: object, what: str) -> None:
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(f"{what}: a file entry is not an object")
    check_name("file name", entry.get("path"))
    chunks = entry.get("chunks")
    if not isinstance(chunks, list) or not all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], int)
        for c in chunks
    ):
        raise InvalidCheckpoint(f"{what}: file {entry.get('path')!r} has malformed chunks")
    if sum(size for _, size in chunks) != entry.get("size"):
        raise InvalidCheckpoint(
            f"{what}: the chunks of {entry['path']!r} do not add up to its size {entry.get('size')}"
        )
    if "digest" in entry:
        if entry["digest"] != digest_of(chunks):
            raise InvalidCheckpoint(
                f"{what}: the chunk list of {entry['path']!r} does not match its digest "
                "(the manifest was altered)"
            )
    elif not isinstance(entry.get("blake3"), str):  # version 1
        raise InvalidCheckpoint(f"{what}: file {entry['path']!r} has no digest")


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its chunk lists: what ``list`` and ``show`` print."""
    components = {
        name: {
            "kind": c["kind"],
            "files": [
                {"path": f["path"], "size": f["size"], "chunks": len(f["chunks"]),
                 "tensors": len(f.get("tensors", []))}
                for f in c["files"]
            ],
        }
        for name, c in manifest["components"].items()
    }  # fmt: skip
    return {**{k: v for k, v in manifest.items() if k != "components"}, "components": components}
