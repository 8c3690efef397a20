"""Input specs -> the list of shards a run reads.

A spec is a local path, a glob (``shards/*.tar``), a brace pattern
(``shards/{00000000..00000127}.tar``) or an fsspec URL (``file://``, ``memory://``,
``s3://bucket/shards/*.tar`` ...; globs go through fsspec too). Braces are expanded first,
then globs. A directory holding shard files (``.tar``, ``.parquet``) stands for those shards;
any other directory is an image folder (see :mod:`mlmfilter.io.readers`). img2dataset writes
``00000.parquet`` and ``00000_stats.json`` beside ``00000.tar``: where a folder or glob yields
both a tar and a parquet of the same stem, the parquet is that sidecar (URLs and status, no
images) and is not an input.

A spec naming a path that exists is taken literally, before any brace or glob expansion
(``shard[1].tar`` is that file, not ``shard1.tar``). FIFOs and devices (also behind symlinks)
are refused with a ValueError naming the path: they would hang or never end a reader.

``pipe:CMD`` specs (WebDataset style: the shard is the stdout of a shell command) run an
arbitrary command, so they are refused unless the caller opts in with ``allow_pipe=True``.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from mlmfilter.core.errors import MissingCredentialsError, credentials_problem
from mlmfilter.core.ids import shard_id_for, shard_id_stem
from mlmfilter.core.locations import location_of

ShardFormat = Literal["tar", "parquet", "folder"]

PIPE_PREFIX = "pipe:"
_FORMAT_OF_SUFFIX: tuple[tuple[str, ShardFormat], ...] = (
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".tar", "tar"),
    (".parquet", "parquet"),
)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ShardSource:
    id: str  # stable, filename-safe: names the shard's score table and completion marker
    url: str  # local absolute path, fsspec URL, or "pipe:CMD"
    format: ShardFormat

    @property
    def name(self) -> str:
        """Basename of the shard file (what uids are derived from)."""
        return shard_basename(self.url)

    @property
    def is_pipe(self) -> bool:
        return self.url.startswith(PIPE_PREFIX)

    @property
    def uid_name(self) -> str:
        """What the uids of its pairs without one are derived from (:func:`mlmfilter.io.uid.derive_uid`).

        The file name, so the same shard read from anywhere gives the same uids; but a shard whose
        file name another shard of the run already has (its id then carries a hash of its url,
        ``00000-7ceca398``) puts its id before the name, so two different shards never share uids.
        """
        if self.id == shard_id_for(shard_stem(self.url), self.url):
            return self.name
        return f"{self.id}:{self.name}"


def expand_inputs(
    specs: Sequence[str] | str, allow_pipe: bool = False, notes: list[str] | None = None
) -> list[ShardSource]:
    """Expand specs into shard sources, sorted by url and deduplicated.

    A shard named twice (the same url from two specs, or the same local file by another path or
    link) is read once; ``notes``, when given, gets one line saying so.
    Raises FileNotFoundError naming the spec when a path or pattern matches nothing, and
    ValueError for a ``pipe:`` spec without ``allow_pipe`` or a file of unknown format.
    """
    if isinstance(specs, str):
        specs = [specs]
    found: dict[str, ShardFormat] = {}
    named_by: dict[str, str] = {}
    files: dict[tuple[int, int], str] = {}
    twice: list[str] = []
    for spec in specs:
        try:
            expanded = _expand_spec(spec, allow_pipe)
        except Exception as exc:  # object storage without credentials: one line saying which and how
            problem = credentials_problem(exc, spec)
            if problem is None:
                raise
            raise MissingCredentialsError(f"input {spec!r}: {problem}") from None
        for url, fmt in expanded:
            if url in found:
                twice.append(f"{url} (by {named_by[url]!r} and {spec!r})")
                continue
            same = _local_file_key(url)
            if same is not None and same in files:
                twice.append(f"{url} (the same file as {files[same]})")
                continue
            if same is not None:
                files[same] = url
            found[url], named_by[url] = fmt, spec
    if twice and notes is not None:
        notes.append(
            f"{len(twice)} input shard(s) were named more than once and are read once: {twice[0]}"
            + (f" and {len(twice) - 1} more" if len(twice) > 1 else "")
        )
    urls = sorted(found)
    ids = _unique_ids(urls)
    return [ShardSource(id=ids[url], url=url, format=found[url]) for url in urls]


def shard_basename(url: str) -> str:
    """Last path component of a url; for ``pipe:`` specs, of the command's last word."""
    if url.startswith(PIPE_PREFIX):
        words = url[len(PIPE_PREFIX) :].split()
        url = words[-1] if words else "pipe"
    return url.rstrip("/").rsplit("/", 1)[-1]


def format_of_name(name: str) -> ShardFormat | None:
    lowered = name.lower()
    for suffix, fmt in _FORMAT_OF_SUFFIX:
        if lowered.endswith(suffix):
            return fmt
    return None


def shard_stem(url: str) -> str:
    """Basename without its format suffix (``a/00000012.tar`` -> ``00000012``)."""
    name = shard_basename(url)
    lowered = name.lower()
    for suffix, _ in _FORMAT_OF_SUFFIX:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- internals ------------------------------------------------------------------------------------


def _expand_spec(spec: str, allow_pipe: bool) -> list[tuple[str, ShardFormat]]:
    if spec.startswith(PIPE_PREFIX):
        return _expand_pipe(spec, allow_pipe)
    fs, path = fsspec.core.url_to_fs(spec)
    if fs.exists(path):  # a name that exists is taken literally: `shard[1].tar` is not a glob for shard1.tar
        if fs.isdir(path):
            shards = _shards_in_folder(fs, path) or _split_folders(fs, path)
            if shards:
                return [_classify(fs, shard, spec) for shard in shards]
        return [_classify(fs, path, spec)]
    matches: list[tuple[str, ShardFormat]] = []
    for pattern in braceexpand(spec):
        fs, path = fsspec.core.url_to_fs(pattern)
        if _GLOB_CHARS.search(path):
            matches.extend(_expand_glob(fs, path))
        elif fs.exists(path):
            matches.append(_classify(fs, path, spec))
        else:
            raise FileNotFoundError(f"input {spec!r}: {pattern!r} does not exist")
    if not matches:
        raise FileNotFoundError(f"input {spec!r} matches no .tar, .parquet or image folder")
    return matches


def _expand_pipe(spec: str, allow_pipe: bool) -> list[tuple[str, ShardFormat]]:
    if not allow_pipe:
        raise ValueError(
            f"input {spec!r}: 'pipe:' inputs run a shell command and are disabled; "
            "pass allow_pipe=True (CLI: --allow-pipe) to opt in"
        )
    urls = list(braceexpand(spec))
    return [(url, format_of_name(shard_basename(url)) or "tar") for url in urls]


def _expand_glob(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, ShardFormat]]:
    """Glob matches of a known format; other files a loose glob catches (stats json) are skipped."""
    matches = without_sidecars(sorted(m for m in fs.glob(path) if fs.isdir(m) or format_of_name(m)))
    return [_classify(fs, match, path) for match in matches]


def _shards_in_folder(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The shard files directly in a folder (img2dataset's output folder), sidecars left out."""
    from mlmfilter.io.readers.options import CAPTIONS_FILES, IMAGE_EXTS

    names = [
        e["name"] for e in fs.ls(path, detail=True) if e.get("type") != "directory"
    ]  # one listing, no stat per entry
    # images or a captions table beside them: an image folder that happens to hold a parquet
    if any(n.rsplit("/", 1)[-1] in CAPTIONS_FILES or n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for n in names):
        return []
    return without_sidecars(sorted(n for n in names if format_of_name(n)))


def _split_folders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A Hugging Face ``imagefolder`` given at its root: no file of its own, a subfolder per split
    (``train/``, ``test/``) each holding its ``metadata.jsonl|csv``. Each split is an image folder."""
    from mlmfilter.io.readers.options import CAPTIONS_FILES

    entries = fs.ls(path, detail=True)
    if any(e.get("type") != "directory" for e in entries if not e["name"].rsplit("/", 1)[-1].startswith(".")):
        return []
    splits = []
    for entry in entries:
        name = entry["name"]
        if name.rsplit("/", 1)[-1].startswith("."):
            continue
        held = {e["name"].rsplit("/", 1)[-1] for e in fs.ls(name, detail=True) if e.get("type") != "directory"}
        if held & set(CAPTIONS_FILES):
            splits.append(name)
    return sorted(splits)


def without_sidecars(paths: list[str]) -> list[str]:
    """``paths`` less each ``.parquet`` that has a tar of the same stem beside it (img2dataset's sidecar)."""
    tar_stems = {(p.rsplit("/", 1)[0] if "/" in p else "", shard_stem(p)) for p in paths if format_of_name(p) == "tar"}
    return [
        p
        for p in paths
        if format_of_name(p) != "parquet" or ((p.rsplit("/", 1)[0] if "/" in p else "", shard_stem(p)) not in tar_stems)
    ]


def _classify(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> tuple[str, ShardFormat]:
    url = location_of(fs, path)
    _refuse_special_file(fs, path, spec)
    if fs.isdir(path):
        return url.rstrip("/"), "folder"
    fmt = format_of_name(path)
    if fmt is None:
        raise ValueError(f"input {spec!r}: cannot tell the format of {path!r} (expected .tar, .parquet or a folder)")
    return url, fmt


def _refuse_special_file(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> None:
    """A FIFO would hang the reader and a device (``/dev/zero``) stream forever: refuse them here,
    links followed, before anything opens them."""
    if not isinstance(fs, LocalFileSystem):
        return
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = (
            "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"
        )
        raise ValueError(f"input {spec!r}: {os.path.realpath(path)!r} is a {kind}, not a regular file or folder")


def _local_file_key(url: str) -> tuple[int, int] | None:
    """(device, inode) of a local shard file, links followed: one file under two names is one shard."""
    if "://" in url or url.startswith(PIPE_PREFIX):
        return None
    try:
        info = os.stat(url)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _unique_ids(urls: list[str]) -> dict[str, str]:
    """File stems, made filename-safe; a short url hash is appended only where stems collide."""
    counts = Counter(shard_id_stem(shard_stem(url)) for url in urls)
    colliding = {stem for stem, count in counts.items() if count > 1}
    return {url: shard_id_for(shard_stem(url), url, colliding) for url in urls}
