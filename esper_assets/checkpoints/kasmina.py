"""The kernel ids a run uses, read from its Kasmina component's kernel mappings.

Kasmina is the component that maps seeds to the kernels grafted into them, so the
manifest's ``kernels`` can come from the checkpoint itself rather than only from
the caller. :func:`mapped_kernels` reads the component named ``kasmina`` when it is:

- JSON bytes (``bytes``, ``bytearray``, ``memoryview``), or a path to a ``.json``
  file: a JSON object whose ``"kernel_mappings"`` is either an object of seed id ->
  kernel id or a list of kernel ids;
- a path to a ``.safetensors`` file whose ``__metadata__`` has a ``kernel_mappings``
  entry: a JSON string holding that same value (the object or the list itself).

Anything else finds no kernels: no ``kasmina`` component, opaque binary state (not
JSON, or JSON without ``kernel_mappings``), a dict of numpy arrays, another kind of
file. Reads are bounded: JSON over ``MAX_JSON_BYTES`` (16 MiB) is not parsed for
mappings (a mapping table is a few KiB; a document that big is model state), and a
safetensors file is read up to its header only (``MAX_HEADER_BYTES``). A mapping
that is present but malformed (not an object or list, an id that is not a kernel id)
is refused with :class:`InvalidInput` naming the component and the field: silently
dropping it would lose the checkpoint's lineage to its kernels.

May import: ``esper_assets.errors``, ``checkpoints.manifest``, ``checkpoints.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from esper_assets.checkpoints.manifest import check_name
from esper_assets.checkpoints.safetensors import header_length, parse_header
from esper_assets.errors import InvalidCheckpoint, InvalidInput

KASMINA = "kasmina"
FIELD = "kernel_mappings"
MAX_JSON_BYTES = 16 << 20
_NOTHING = object()  # no mappings found (as opposed to mappings that are empty)


def mapped_kernels(components: Mapping[str, object]) -> list[str]:
    """The kernel ids the ``kasmina`` component maps seeds to, sorted and unique."""
    value = components.get(KASMINA) if isinstance(components, Mapping) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        mappings = _from_json_bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        mappings = _from_path(Path(value))
    else:  # absent, a dict of arrays, or something snapshot() will refuse itself
        mappings = _NOTHING
    return [] if mappings is _NOTHING else _kernel_ids(mappings)


def _from_json_bytes(data: bytes | bytearray | memoryview) -> object:
    """``kernel_mappings`` of a JSON object, or _NOTHING for bytes that are not one."""
    if memoryview(data).nbytes > MAX_JSON_BYTES:
        return _NOTHING
    try:
        document = json.loads(bytes(data))
    except (ValueError, RecursionError):  # opaque state (UnicodeDecodeError is a ValueError)
        return _NOTHING
    if not isinstance(document, dict):
        return _NOTHING
    return document.get(FIELD, _NOTHING)


def _from_path(path: Path) -> object:
    if path.suffix == ".json":
        size = _size(path)
        return _NOTHING if size > MAX_JSON_BYTES else _from_json_bytes(_read(path, size))
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    return _NOTHING


def _from_safetensors(path: Path) -> object:
    """The ``kernel_mappings`` entry of the file's ``__metadata__`` (a JSON string),
    read from the header alone; a file whose header is not valid is refused here just
    as the save would refuse it."""
    what = f"component {KASMINA!r} ({path})"
    size = _size(path)
    n = header_length(_read(path, 8), size, what)
    metadata = parse_header(_read(path, 8 + n), size, what).metadata or {}
    if FIELD not in metadata:
        return _NOTHING
    try:
        return json.loads(metadata[FIELD])
    except (ValueError, RecursionError):
        raise InvalidInput(
            f"component {KASMINA!r}: __metadata__[{FIELD!r}] of {path} is not JSON; "
            "it must hold a JSON object of seed id -> kernel id or a JSON list of kernel ids"
        ) from None


def _kernel_ids(mappings: object) -> list[str]:
    if isinstance(mappings, dict):
        places = mappings.items()
    elif isinstance(mappings, list):
        places = enumerate(mappings)
    else:
        raise InvalidInput(
            f"component {KASMINA!r}: {FIELD!r} must be an object of seed id -> kernel id "
            f"or a list of kernel ids, got {type(mappings).__name__}"
        )
    return sorted(
        {check_name(f"component {KASMINA!r}: {FIELD}[{where!r}] (a kernel id)", kernel)
         for where, kernel in places}
    )  # fmt: skip


def _size(path: Path) -> int:
    """Its size; only a regular file (reading a FIFO or device could block or never end)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _unreadable(path, exc.strerror) from None
    if not path.is_file():
        raise _unreadable(path, "not a regular file")
    return st.st_size


def _read(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path`` (fewer if it is shorter)."""
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise _unreadable(path, exc.strerror) from None


def _unreadable(path: Path, why: str | None) -> InvalidCheckpoint:
    return InvalidCheckpoint(f"component {KASMINA!r}: cannot read {path} ({why})")
