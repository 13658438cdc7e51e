"""What arrived in the landing zone since the last look: the new_blueprints sensor's logic;
and what arrived and has no kernel yet (``BacklogWatch``, the sensor lag /metrics shows).

The cursor is a high-water mark, not a list of every file seen: the newest change
stamp seen plus the files sharing it (each with a short digest of its version, so
new content written within the same stamp, e.g. the same second on S3, is still
new), and the few children waiting for their parent. So a tick costs one listing
plus work on the new files only, and the cursor stays small however many
blueprints have landed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from esper_assets.blueprints import (
    BLUEPRINT_SUFFIXES,
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    blueprint_name_for_file,
    kernel_id_for,
    name_problem,
    parse_blueprint,
)
from esper_assets.errors import EsperError, InvalidInput
from esper_assets.flows.landing import LandedFile, LandingZone
from esper_assets.storage import AssetRepository

# A child whose parent is in the landing zone waits this many ticks for the parent
# to be registered; after that its run goes ahead (and fails clearly if it must).
MAX_WAITS = 10


@dataclass
class Cursor:
    stamp: int = -1
    at_stamp: dict[str, str] = field(default_factory=dict)  # key -> version digest
    waiting: dict[str, int] = field(default_factory=dict)  # key -> ticks waited
    # A digest of the partitions without a file that the last tick looked up and kept
    # (the sensor's removal policy): the same set again is not looked up again.
    settled: str = ""

    def dump(self) -> str:
        raw = {"stamp": self.stamp, "at": self.at_stamp, "wait": self.waiting}
        return json.dumps(raw | ({"settled": self.settled} if self.settled else {}))

    @classmethod
    def load(cls, text: str | None) -> Cursor:
        """An unreadable cursor means: look at everything again; a cursor from before
        file versions (``at`` a list of keys) means: look again at the files at its
        stamp. Either way runs dedupe by run key, so looking again is safe."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            at = raw["at"]
            at_stamp = {str(k): str(v) for k, v in at.items()} if isinstance(at, dict) else {}
            waiting = {str(k): int(v) for k, v in dict(raw["wait"]).items()}
            return cls(int(raw["stamp"]), at_stamp, waiting, str(raw.get("settled", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls()


def version_digest(file: LandedFile) -> str:
    """A short digest of a file's version: 12 hex digits keep the cursor small, and two
    versions of one key at one stamp colliding is a 1 in 2**48 chance."""
    return hashlib.blake2b(file.version.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class Arrival:
    """A landed file to ingest: its blueprint name (the partition) and content hash."""

    name: str
    key: str
    file_sha256: str

    @property
    def run_key(self) -> str:
        return f"{self.name}:{self.file_sha256}"


@dataclass
class Scan:
    arrivals: list[Arrival] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # key, reason, moved to
    waiting: list[str] = field(default_factory=list)
    cursor: Cursor = field(default_factory=Cursor)
    # The blueprint name of every file in blueprints/ at this look, new or not.
    landed: set[str] = field(default_factory=set)


def scan_landing(
    landing: LandingZone,
    cursor: Cursor,
    is_registered: Callable[[str, str], bool],
    limits: BlueprintLimits | None = None,
) -> Scan:
    """Find files new since ``cursor``; reject unusable names; hold back children whose
    parent is in the landing zone but not registered yet (its run may still be going)."""
    files = landing.list_blueprints()
    new = sorted(f for f in files if _is_new(f, cursor) or f.key in cursor.waiting)
    landing_now = {blueprint_name_for_file(f.key) for f in files}
    scan = Scan(cursor=_advance(cursor, files), landed=landing_now)
    for file in new:
        _look_at(landing, file, cursor, scan, landing_now, is_registered, limits)
    return scan


def _is_new(file: LandedFile, cursor: Cursor) -> bool:
    return file.changed_ns > cursor.stamp or (
        file.changed_ns == cursor.stamp and cursor.at_stamp.get(file.key) != version_digest(file)
    )


def _advance(cursor: Cursor, files: list[LandedFile]) -> Cursor:
    # Every file at the new stamp is in this listing, so it alone says what was seen
    # there (a file gone since no longer needs remembering).
    stamp = max([cursor.stamp, *(f.changed_ns for f in files)])
    at = {f.key: version_digest(f) for f in sorted(files) if f.changed_ns == stamp}
    return Cursor(stamp, at, {})


def _look_at(
    landing: LandingZone,
    file: LandedFile,
    cursor: Cursor,
    scan: Scan,
    landing_now: set[str],
    is_registered: Callable[[str, str], bool],
    limits: BlueprintLimits | None,
) -> None:
    problem = file_name_problem(file.key)
    if problem is not None:
        try:
            moved_to = landing.reject(file.key, problem)
        except EsperError as exc:
            moved_to = f"(not moved: {exc})"
        scan.rejected.append((file.key, problem, moved_to))
        return
    try:
        data = landing.read(file.key)
    except InvalidInput:
        return  # gone between listing and reading: nothing to do
    name = blueprint_name_for_file(file.key)
    parent = _parent_of(data, file.key, name, limits)
    waited = cursor.waiting.get(file.key, 0)
    if (
        parent is not None
        and parent[0] in landing_now
        and waited < MAX_WAITS
        and not is_registered(*parent)
    ):
        scan.cursor.waiting[file.key] = waited + 1
        scan.waiting.append(file.key)
        return
    scan.arrivals.append(Arrival(name, file.key, hashlib.sha256(data).hexdigest()))


def file_name_problem(key: str) -> str | None:
    """Why ``key`` cannot name a blueprint partition, or None."""
    if not key.endswith(BLUEPRINT_SUFFIXES):
        return (
            f"{key!r} is not a blueprint file: name it <blueprint name> with one of "
            f"{', '.join(BLUEPRINT_SUFFIXES)}"
        )
    problem = name_problem(blueprint_name_for_file(key))
    return (
        None
        if problem is None
        else f"file {key!r}: {problem}; rename the file to the blueprint's name"
    )


def _parent_of(
    data: bytes, key: str, name: str, limits: BlueprintLimits | None
) -> tuple[str, str] | None:
    """The (name, version) the blueprint derives from; None if none or it does not parse
    (the run will report why)."""
    try:
        bp: Blueprint = parse_blueprint(
            data, source=key, limits=limits or BlueprintLimits(), expected_name=name
        )
    except BlueprintInvalid:
        return None
    return (bp.parent_name, bp.parent_version) if bp.parent else None


# -- the backlog: landed files no kernel was built from yet ---------------------------------
@dataclass(frozen=True)
class Backlog:
    pending: int = 0  # files whose content has no kernel yet
    oldest_ns: int | None = None  # the change stamp of the oldest of them
    invalid: int = 0  # files that can never become a kernel as they are (bad name or content)


DONE, INVALID = "", "!"  # what BacklogWatch knows of a file version; else the kernel id it awaits


class BacklogWatch:
    """Which blueprint files in the landing zone no kernel has been built from yet: the
    work the new_blueprints sensor and its runs have still to do.

    What it learns about a file version is kept until the file changes or goes, so one
    look costs a listing, a query for the newest kernel of each landed name (a file older
    than its name's newest kernel was compiled, or found compiled before, by the run it
    started) and, for the rest, parsing each file version once (at most ``parse_budget``
    a look: ~1 ms each) to learn its kernel id, then one lookup of the ids still awaited.
    A file not parsed yet counts as pending.
    """

    def __init__(self, parse_budget: int = 64) -> None:
        self.parse_budget = parse_budget
        self._known: dict[tuple[str, str], str] = {}  # (key, version) -> DONE, INVALID, kernel id

    def look(self, landing: LandingZone, repo: AssetRepository) -> Backlog:
        files = {(f.key, f.version): f for f in landing.list_blueprints()}
        self._known = {k: v for k, v in self._known.items() if k in files}  # gone: forgotten
        unknown = [f for k, f in sorted(files.items()) if k not in self._known]
        self._clear_older_than_kernels(repo, unknown)
        self._parse(landing, [f for f in unknown if (f.key, f.version) not in self._known])
        awaited = {v for v in self._known.values() if v not in (DONE, INVALID)}
        built = repo.existing_ids(awaited) if awaited else set()
        self._known = {k: DONE if v in built else v for k, v in self._known.items()}
        pending = [f for k, f in files.items() if self._known.get(k) not in (DONE, INVALID)]
        return Backlog(
            len(pending),
            min((f.changed_ns for f in pending), default=None),
            sum(v == INVALID for v in self._known.values()),
        )

    def _clear_older_than_kernels(self, repo: AssetRepository, files: list[LandedFile]) -> None:
        names = {blueprint_name_for_file(f.key) for f in files}
        newest = repo.newest_created("kernel", names) if names else {}
        for f in files:
            built = newest.get(blueprint_name_for_file(f.key))
            if built is not None and built.timestamp() * 1e9 >= f.changed_ns:
                self._known[(f.key, f.version)] = DONE

    def _parse(self, landing: LandingZone, files: list[LandedFile]) -> None:
        for f in sorted(files)[: self.parse_budget]:  # oldest first: they set the lag
            try:
                self._known[(f.key, f.version)] = _awaited_kernel(landing, f.key)
            except InvalidInput:
                continue  # gone between listing and reading


def _awaited_kernel(landing: LandingZone, key: str) -> str:
    """The id of the kernel ``key``'s content compiles to, or INVALID (default limits)."""
    if file_name_problem(key) is not None:
        return INVALID  # the sensor's next tick moves it to rejected/
    try:
        bp = parse_blueprint(
            landing.read(key), source=key, expected_name=blueprint_name_for_file(key)
        )
    except BlueprintInvalid:
        return INVALID
    return kernel_id_for(bp)
