"""The run folder: everything a run leaves behind, inspectable and resumable without a database.

    RUN/run.yaml                        every input source ever added (id -> url, format, size, mtime/etag)
                                        and the read options all stages share
    RUN/<stage>/stage.yaml              the stage's kind, options, identity and fingerprint
    RUN/<stage>/provenance.json         models, preprocessing, versions, warnings of the stage
    RUN/<stage>/tables/<shard>.parquet  one table per input shard, one row per input pair
    RUN/<stage>/stats/<shard>.json      per-shard counts and timings
    RUN/<stage>/completions/<shard>.json  written last: the shard's source identity, fingerprint, rows
    RUN/<stage>/stats.json              sum of the completed shards' stats
    RUN/logs/                           one log per process
    RUN/.lock                           held by the process running a stage (local folders)

Shard ids are given once per source url and never change: a run's inputs may grow (a second
``score`` with more shards extends it), and a new source whose file name is already taken gets
the name plus a short hash of its url. A marker is trusted only after checking what it promises:
the table is there with the row count it names, and the source is still the file it was made
from.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import yaml

from mlmfilter import __version__
from mlmfilter.core.errors import LAYOUT_ERRORS
from mlmfilter.core.ids import shard_id_for
from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import ShardSource, shard_stem
from mlmfilter.runs.storage import RunStorage

log = logging.getLogger(__name__)

RUN_FILE = "run.yaml"
LOGS_DIR = "logs"
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: what a stage folder holds; a folder of the run holding anything else is not a stage's (a
#: selection, a user's own folder) and is never written into or cleared as one
STAGE_ENTRIES = frozenset({"stage.yaml", "provenance.json", "stats.json", "tables", "stats", "completions"})


class RunError(ValueError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class ConfigMismatch(RunError):
    """A stage is resumed (or a run extended) with settings other than the ones it was made with."""


class SourceChanged(RunError):
    """An input shard changed on disk after a stage finished it."""


class RunLocked(RunError):
    """Another process is running a stage in this folder."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def source_identity(source: ShardSource) -> dict[str, Any]:
    """What makes a source the same file later: size and mtime (local) or etag/size (object stores)."""
    identity: dict[str, Any] = {"url": source.url, "format": source.format}
    if source.is_pipe:
        return identity
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source.url)
        info = fs.info(path)
    except (OSError, ValueError):
        return identity
    if info.get("type") == "directory":
        return identity  # an image folder: its files are checked by the reader, not here
    identity["size"] = info.get("size")
    for key in ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            identity[key.lower() if key != "LastModified" else "last_modified"] = (
                value if isinstance(value, (int, float, str)) else str(value)
            )
            break
    return identity


def _same_file(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    keys = (set(recorded) & set(current)) - {"url", "format"}
    return all(recorded[k] == current[k] for k in keys)


@dataclass(frozen=True)
class Completeness:
    done: int
    total: int
    missing: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.total > 0 and not self.missing

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "shards_done": self.done,
            "shards_total": self.total,
            "missing": list(self.missing[:20]),
        }


class StageFolder:
    """``RUN/<stage>/``: one stage's tables, markers and stats."""

    def __init__(self, storage: RunStorage, name: str):
        if not _STAGE_NAME.match(name) or name == LOGS_DIR:
            raise RunError(f"invalid stage name {name!r} (letters, digits, - and _; not {LOGS_DIR!r})")
        self.storage = storage
        self.name = name

    def rel(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def table_rel(self, shard_id: str) -> str:
        return self.rel("tables", f"{shard_id}.parquet")

    def marker_rel(self, shard_id: str) -> str:
        return self.rel("completions", f"{shard_id}.json")

    def stats_rel(self, shard_id: str) -> str:
        return self.rel("stats", f"{shard_id}.json")

    @property
    def exists(self) -> bool:
        return self.storage.exists(self.rel("stage.yaml"))

    def create(self) -> None:
        self._refuse_foreign_folder()
        for sub in ("tables", "stats", "completions"):
            self.storage.makedirs(self.rel(sub))

    def _refuse_foreign_folder(self) -> None:
        """``RUN/<name>`` may be missing, empty or a stage's; anything else is refused, untouched."""
        entries = self.storage.list_names(self.name) + self.storage.list_dirs(self.name)
        foreign = sorted(e for e in entries if e not in STAGE_ENTRIES and not e.startswith("."))
        if foreign:
            raise RunError(
                f"{self.storage.path(self.name)} is not a stage folder (it holds {', '.join(foreign[:3])}); "
                "give the stage another name (--stage NAME)"
            )

    # -- stage settings ---------------------------------------------------------------------------
    def read_settings(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.rel("stage.yaml")):
            return None
        settings = read_yaml_record(self.storage, self.rel("stage.yaml"), "a stage's settings")
        if not isinstance(settings.get("fingerprint"), str):
            raise RunError(
                f"{self.storage.path(self.rel('stage.yaml'))} is not a stage's settings (no fingerprint); "
                "restore it, or redo the stage with --overwrite"
            )
        return settings

    def check_or_write_settings(self, settings: dict[str, Any]) -> str:
        """The first run writes the settings; a resume must produce the same table, or it would mix.

        Returns the fingerprint the stage's markers carry: a resume with the same settings keeps the
        first run's, also where only the spelling of a local model folder differs (``./m``, ``m/``:
        its content hash names the model).
        """
        if self.done_shards():
            previous = self.read_settings()  # an unreadable record matters only when shards rely on it
            if previous is not None:
                if previous["fingerprint"] != settings["fingerprint"]:
                    changed = _changed_keys(
                        _without_model_spelling(previous.get("identity", {})),
                        _without_model_spelling(settings["identity"]),
                    )
                    if changed:
                        raise ConfigMismatch(
                            f"stage {self.name!r} of {self.storage.url} was made with other settings "
                            f"(changed: {', '.join(changed)}; fingerprint {previous['fingerprint']} "
                            f"vs {settings['fingerprint']}); mixing them would mix incomparable scores. "
                            "Use another output folder, another stage name (--stage NAME), or --overwrite to redo the stage"
                        )
                return previous["fingerprint"]  # keep the record of the first run
        self.storage.write_bytes(self.rel("stage.yaml"), yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
        return settings["fingerprint"]

    def read_provenance(self) -> dict[str, Any]:
        if not self.storage.exists(self.rel("provenance.json")):
            return {}
        return read_json_record(self.storage, self.rel("provenance.json"), "a stage's provenance")

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        self.storage.write_bytes(self.rel("provenance.json"), _json(provenance))

    # -- markers ----------------------------------------------------------------------------------
    def done_shards(self) -> list[str]:
        return [n[: -len(".json")] for n in self.storage.list_names(self.rel("completions"), ".json")]

    def read_marker(self, shard_id: str) -> dict[str, Any] | None:
        rel = self.marker_rel(shard_id)
        if not self.storage.exists(rel):
            return None
        if self.storage.is_dir(rel):
            raise RunError(
                f"{self.storage.path(rel)} is a folder, not a completion marker; remove it (the shard is then redone)"
            )
        try:
            marker = json.loads(self.storage.read_text(rel))
        except ValueError:
            return {}  # a damaged marker promises nothing
        return marker if isinstance(marker, dict) else {}

    def finish_shard(self, shard_id: str, table, stats: ShardStats, marker: dict[str, Any]) -> None:
        """Table, then stats, then the marker: only a shard with all three is done."""
        self.storage.write_parquet(self.table_rel(shard_id), table)
        self.storage.write_bytes(self.stats_rel(shard_id), _json({"shard": shard_id, **stats.to_json()}))
        self.storage.write_bytes(self.marker_rel(shard_id), _json({**marker, "rows": table.num_rows}))

    def verify(self, shard_id: str, source: ShardSource, fingerprint: str) -> bool:
        """True when the shard is done and its marker's promises hold; a broken promise is redone.

        Raises SourceChanged when the source file is no longer the one the table was made from.
        """
        marker = self.read_marker(shard_id)
        if marker is None:
            return False
        problem = None
        if marker.get("fingerprint") != fingerprint:
            problem = f"its marker has fingerprint {marker.get('fingerprint')}, the stage {fingerprint}"
        elif not self.storage.exists(self.table_rel(shard_id)):
            problem = "its table is missing"
        else:
            try:
                rows = self.storage.parquet_rows(self.table_rel(shard_id))
            except Exception as exc:  # truncated or overwritten: unreadable footer
                problem = f"its table is unreadable ({type(exc).__name__}: {exc})"
            else:
                if rows != marker.get("rows"):
                    problem = f"its table has {rows} rows, the marker promises {marker.get('rows')}"
        if problem is None and not self._stats_readable(shard_id):
            problem = "its stats file is missing or unreadable"
        if problem is None:
            recorded = marker.get("source") if isinstance(marker.get("source"), dict) else {}
            current = source_identity(source)
            if not _same_file(recorded, current):
                raise SourceChanged(
                    f"input {source.url} changed after stage {self.name!r} finished it "
                    f"(recorded {_describe(recorded)}, now {_describe(current)}); "
                    "its rows would no longer match the shard. Use another output folder, or --overwrite"
                )
            return True
        log.warning("stage %s, shard %s: %s; redoing the shard", self.name, shard_id, problem)
        self.storage.remove(self.marker_rel(shard_id))
        return False

    def _stats_readable(self, shard_id: str) -> bool:
        try:
            return self.read_stats(shard_id) is not None
        except RunError:
            return False

    def read_stats(self, shard_id: str) -> ShardStats | None:
        rel = self.stats_rel(shard_id)
        if not self.storage.exists(rel):
            return None
        record = read_json_record(self.storage, rel, "a shard's stats")
        try:
            return ShardStats.from_json(record)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise RunError(
                f"{self.storage.path(rel)} is not a shard's stats ({type(exc).__name__}: {exc}); "
                "remove it with the shard's marker to redo the shard"
            ) from None

    def merged_stats(self) -> ShardStats:
        parts = (self.read_stats(shard_id) for shard_id in self.done_shards())
        return ShardStats.total(part for part in parts if part is not None)

    def write_merged_stats(self) -> ShardStats:
        stats = self.merged_stats()
        text, rel = _json(stats.to_json()), self.rel("stats.json")
        if not (self.storage.exists(rel) and not self.storage.is_dir(rel) and self.storage.read_text(rel) == text):
            self.storage.write_bytes(rel, text)  # unchanged (a no-op resume): not rewritten, a read-only run works
        return stats

    def clear(self) -> None:
        self._refuse_foreign_folder()
        self.storage.remove_tree(self.name)


class RunFolder:
    """A run: its registered sources, shared read options, stages and logs."""

    def __init__(self, path: str | os.PathLike):
        self.storage = RunStorage(path)
        self.url = self.storage.url

    @property
    def path(self):
        """The local path (pathlib) of a local run folder."""
        from pathlib import Path

        local = self.storage.local_path()
        if local is None:
            raise RunError(f"{self.url} is not a local folder")
        return Path(local)

    @property
    def is_run(self) -> bool:
        return self.storage.exists(RUN_FILE)

    def stage(self, name: str) -> StageFolder:
        return StageFolder(self.storage, name)

    def stages(self) -> list[str]:
        return [d for d in self.storage.list_dirs() if d != LOGS_DIR and self.storage.exists(f"{d}/stage.yaml")]

    def logs_dir(self) -> str | None:
        return self.storage.local_path(LOGS_DIR)

    # -- run record -------------------------------------------------------------------------------
    def read_record(self) -> dict[str, Any]:
        if not self.is_run:
            raise RunError(f"{self.url} is not a run folder (no {RUN_FILE}); make one with `mlmfilter score`")
        record = read_yaml_record(self.storage, RUN_FILE, "a run record")
        if not record.get("sources"):
            raise RunError(
                f"{self.storage.path(RUN_FILE)} is not a run record: it registers no input shard; "
                "restore it, or use another output folder"
            )
        if not isinstance(record.get("sources"), dict) or not isinstance(record.get("inputs", []), list):
            raise RunError(
                f"{self.storage.path(RUN_FILE)} is not a run record (its sources or inputs are not a mapping and a list); "
                "restore it, or use another output folder"
            )
        record.setdefault("inputs", [])
        record.setdefault("sources", {})
        for sid, entry in record["sources"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise RunError(f"{self.storage.path(RUN_FILE)}: source {sid!r} has no url; restore the file")
        return record

    def _write_record(self, record: dict[str, Any]) -> None:
        self.storage.write_bytes(RUN_FILE, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))

    def sources(self) -> dict[str, ShardSource]:
        record = self.read_record()
        return {
            sid: ShardSource(id=sid, url=s["url"], format=s.get("format", "tar"))
            for sid, s in record.get("sources", {}).items()
        }

    def read_options(self) -> dict[str, Any]:
        return dict(self.read_record().get("read") or {})

    def open(
        self,
        inputs: Iterable[str],
        sources: list[ShardSource],
        read_options: Mapping[str, Any],
        partitions: tuple[str, int] | None = None,
    ) -> list[ShardSource]:
        """Create or extend the run with ``sources``; returns them with their run-wide ids.

        The run's read options are part of what every table means: extending a run with other
        read options is refused. ``partitions=(stage, N)``: this is one of N partition jobs filling
        that stage; run.yaml records N, and a job of another N is refused while the stage has
        shards left to do (its shares would overlap theirs).
        """
        self.storage.makedirs(LOGS_DIR)
        with _RecordLock(self):
            return self._open_locked(inputs, sources, read_options, partitions)

    def _open_locked(
        self,
        inputs: Iterable[str],
        sources: list[ShardSource],
        read_options: Mapping[str, Any],
        partitions: tuple[str, int] | None = None,
    ) -> list[ShardSource]:
        record = (
            self.read_record()
            if self.is_run
            else {
                "mlmfilter": __version__,
                "created": now_iso(),
                "inputs": [],
                "read": dict(read_options),
                "sources": {},
            }
        )
        if (record.get("read") or {}) != dict(read_options):
            if not self._nothing_read():
                raise ConfigMismatch(
                    f"{self.url} was read with read options {record.get('read') or {}}, not {dict(read_options)}; "
                    "use another output folder or --overwrite"
                )
            # no pair was ever read with the old options (the wrong column, say): they describe nothing,
            # so the corrected ones replace them, and the shards read with the old ones are read again
            log.info(
                "%s: no pair could be read with read options %s; reading with %s",
                self.url,
                record.get("read") or {},
                dict(read_options),
            )
            for name in self.stages():
                self.stage(name).clear()
            record["read"] = dict(read_options)
            self._write_record(record)
        registered: dict[str, dict[str, Any]] = record.setdefault("sources", {})
        changed = self._check_partitions(record, partitions) if partitions is not None else False
        by_url = {entry["url"]: sid for sid, entry in registered.items()}
        taken = set(registered)
        out: list[ShardSource] = []
        for source in sources:
            identity = source_identity(source)
            sid = by_url.get(source.url)
            if sid is None:
                sid = shard_id_for(shard_stem(source.url), source.url, taken)
                taken.add(sid)
                registered[sid] = {**identity, "added": now_iso()}
                by_url[source.url] = sid
                changed = True
            elif not _same_file(registered[sid], identity):
                self._check_unchanged(sid, source, registered[sid], identity)
                registered[sid] = {**identity, "added": registered[sid].get("added")}
                changed = True
            out.append(ShardSource(id=sid, url=source.url, format=source.format))
        for spec in inputs:
            if spec not in record["inputs"]:
                record["inputs"].append(spec)
                changed = True
        if changed or not self.is_run:
            self._write_record(record)
        return out

    def _nothing_read(self) -> bool:
        """True when no done shard of any stage holds a pair that was read: in each one every row lacked its
        image or caption, or the shard could not be opened (``LAYOUT_ERRORS``). Such a run's read options
        found nothing, so they may be corrected without ``--overwrite``."""
        for name in self.stages():
            stage = self.stage(name)
            for shard_id in stage.done_shards():
                stats = stage.read_stats(shard_id)
                failed = {code for code, n in (stats.errors if stats else {}).items() if n}
                if stats is None or stats.ok or not failed <= LAYOUT_ERRORS:
                    return False
        return True

    def _check_partitions(self, record: dict[str, Any], partitions: tuple[str, int]) -> bool:
        """Refuse a partition job of another N than the jobs filling the stage; record N. True if changed."""
        stage, count = partitions
        recorded = (record.get("partitions") or {}).get(stage)
        if recorded == count:
            return False
        if recorded is not None:
            done = set(self.stage(stage).done_shards()) if self.storage.exists(stage) else set()
            left = [sid for sid in record["sources"] if sid not in done]
            if left:
                raise ConfigMismatch(
                    f"stage {stage!r} of {self.url} is being filled by --partition i/{recorded} jobs "
                    f"({len(record['sources']) - len(left)} of {len(record['sources'])} shards done); "
                    f"a job of i/{count} would score some shards twice: run it as i/{recorded}, "
                    "or finish the stage without --partition"
                )
        record["partitions"] = {**(record.get("partitions") or {}), stage: count}
        return True

    def _check_unchanged(self, sid: str, source: ShardSource, recorded: dict, current: dict) -> None:
        finished = [name for name in self.stages() if self.stage(name).read_marker(sid) is not None]
        if finished:
            raise SourceChanged(
                f"input {source.url} changed since stage(s) {', '.join(finished)} finished it "
                f"(recorded {_describe(recorded)}, now {_describe(current)}); "
                "use another output folder, or --overwrite"
            )

    def completeness(self, stage: str) -> Completeness:
        sources = self.sources()
        done = set(self.stage(stage).done_shards()) if self.storage.exists(stage) else set()
        missing = tuple(sorted(sid for sid in sources if sid not in done))
        return Completeness(done=len(set(sources) & done), total=len(sources), missing=missing)

    def clear(self) -> None:
        """Remove everything of an earlier run (``--overwrite``), keeping the folder itself."""
        for name in self.storage.list_dirs():
            if name != LOGS_DIR:
                self.storage.remove_tree(name)
        for name in self.storage.list_names(""):
            self.storage.remove(name)


# -- locking --------------------------------------------------------------------------------------


class RunLock:
    """One process at a time runs stages in a run folder; a second one is refused, not queued.

    Local folders use ``flock`` on ``RUN/.lock`` (released by the kernel when the holder dies,
    so a killed run never leaves a stale lock). ``partition="i/N"`` jobs (e.g. a Slurm array
    scoring disjoint shards into one folder) share that lock and each holds its own
    ``RUN/.lock-i-of-N`` exclusively: partitions run side by side, a whole-run job excludes them
    all. Object stores have no locks: ``RUN/lock.json`` is written and checked, and a lock older
    than ``stale_after`` seconds is taken over.
    """

    def __init__(self, folder: RunFolder, stale_after: float = 3600.0, partition: str | None = None):
        self.folder = folder
        self.stale_after = stale_after
        self.partition = partition
        self._fds: list[int] = []

    def holder(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "partition": self.partition}

    def acquire(self) -> "RunLock":
        storage = self.folder.storage
        if storage.is_local:
            os.makedirs(storage.root, exist_ok=True)
            if self.partition is None:
                self._flock(".lock", shared=False)
            else:
                self._flock(".lock", shared=True)
                self._flock(".lock-" + self.partition.replace("/", "-of-"), shared=False)
            return self
        name = "lock.json" if self.partition is None else f"lock-{self.partition.replace('/', '-of-')}.json"
        if storage.exists(name):
            info = json.loads(storage.read_text(name))
            since = _dt.datetime.fromisoformat(info.get("since", "1970-01-01T00:00:00+00:00"))
            age = (_dt.datetime.now(_dt.timezone.utc) - since).total_seconds()
            if age < self.stale_after:
                raise RunLocked(
                    f"{storage.url} is in use by another mlmfilter process ({info}); "
                    f"wait for it, or delete {name} if that process is gone"
                )
            log.warning("taking over a stale lock of %s (%s)", storage.url, info)
        storage.write_bytes(name, json.dumps(self.holder()))
        self._remote_name = name
        return self

    def _flock(self, name: str, shared: bool) -> None:
        import fcntl

        fd = _open_lock_file(self.folder.storage, name)
        if fd is None:
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            self.release()
            raise RunLocked(
                f"{self.folder.url} is in use by another mlmfilter process ({info or 'a partition job'}); "
                "wait for it to finish or stop it, or use another output folder"
            ) from None
        if not shared:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(self.holder()).encode())
            except OSError:
                pass  # opened read-only: the folder cannot be written, the lock still excludes
        self._fds.append(fd)

    def release(self) -> None:
        storage = self.folder.storage
        while self._fds:
            os.close(self._fds.pop())  # closing drops the flock
        if not storage.is_local and getattr(self, "_remote_name", None):
            storage.remove(self._remote_name)
            self._remote_name = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _RecordLock:
    """Held for the moment run.yaml is read, changed and written (partition jobs register concurrently)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self._fd: int | None = None

    def __enter__(self) -> "_RecordLock":
        if self.folder.storage.is_local:
            import fcntl

            os.makedirs(self.folder.storage.root, exist_ok=True)
            self._fd = _open_lock_file(self.folder.storage, ".lock-record")
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # held for milliseconds: waiting is right here
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_lock_file(storage: RunStorage, name: str) -> int | None:
    """A lock file of the folder, never through a link (a planted ``.lock -> /etc/...`` would be truncated).

    In a folder this process cannot write (a read-only filesystem, another user's folder) the lock is
    taken on the existing file opened for reading, or not at all when there is none: nothing can be
    written there anyway, and a run with nothing to do (a no-op resume) still works.
    """
    path = storage.path(name)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise RunError(
                f"{path} is a symbolic link (to {os.readlink(path)}); mlmfilter never writes through a link "
                f"inside {storage.root}: remove it"
            ) from None
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        log.debug("%s cannot be written: running without its lock", storage.root)
        return None


# -- records --------------------------------------------------------------------------------------


def read_yaml_record(storage: RunStorage, rel: str, what: str) -> dict[str, Any]:
    """A YAML mapping of the folder; anything else (empty, invalid, tags, a folder) is a RunError naming the file."""
    text = _read_record_text(storage, rel, what)
    try:
        record = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())[:300]
        raise RunError(f"{storage.path(rel)} is not {what}: invalid YAML ({problem}); restore it") from None
    if not isinstance(record, dict):
        found = "empty" if record is None else f"a {type(record).__name__}, not a mapping"
        raise RunError(f"{storage.path(rel)} is not {what}: it is {found}; restore it")
    return record


def read_json_record(storage: RunStorage, rel: str, what: str) -> dict[str, Any]:
    """A JSON object of the folder; anything else is a RunError naming the file."""
    text = _read_record_text(storage, rel, what)
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise RunError(f"{storage.path(rel)} is not {what}: invalid JSON ({exc}); restore or remove it") from None
    if not isinstance(record, dict):
        raise RunError(f"{storage.path(rel)} is not {what}: a JSON {type(record).__name__}, not an object")
    return record


def _read_record_text(storage: RunStorage, rel: str, what: str) -> str:
    if storage.is_dir(rel):
        raise RunError(f"{storage.path(rel)} is a folder, not {what}; remove it")
    try:
        return storage.read_text(rel)
    except UnicodeDecodeError:
        raise RunError(f"{storage.path(rel)} is not {what}: not UTF-8 text; restore it") from None


# -- helpers --------------------------------------------------------------------------------------


def _load_yaml(storage: RunStorage, rel: str) -> Any:
    """A run folder's YAML file, read safely: anything but plain data (``!!python/...`` tags, broken
    syntax) is refused with a RunError naming the file, never constructed."""
    try:
        return yaml.safe_load(storage.read_text(rel))
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise RunError(f"{storage.path(rel)} is not a valid run file ({problem})") from None


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += _changed_keys(a, b, f"{prefix}{i}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _without_model_spelling(identity: Any) -> Any:
    """``identity`` less the name a local model folder was given where its content hash is recorded
    beside it (``model: ./m`` and ``model: m/`` with the same ``content_hash`` are one model)."""
    if isinstance(identity, dict):
        local = "content_hash" in identity
        return {k: _without_model_spelling(v) for k, v in identity.items() if not (local and k == "model")}
    if isinstance(identity, list):
        return [_without_model_spelling(v) for v in identity]
    return identity


def _describe(identity: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in identity.items() if k not in ("url", "format", "added")) or "no size/mtime"


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
