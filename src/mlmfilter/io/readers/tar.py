"""WebDataset tar shards, streamed member by member, never held in memory.

Members are checked from their header before any byte is read: a member over
``max_member_bytes`` is skipped unread (stream mode seeks past it) and fails its sample; a
member with an absolute or ``..`` name, a symlink, hardlink, device or FIFO member is never
followed or read and becomes an ``unsafe_member`` row naming it."""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers.files import open_shard_file, too_large
from mlmfilter.io.readers.gzip_check import CheckedGzip, GzipDamaged, StreamDamage, drain, find_damage, sniff
from mlmfilter.io.readers.options import ReadOptions
from mlmfilter.io.readers.samples import TRUNCATED_KEY_PREFIX, SampleBuilder, SampleProblem, split_member_name
from mlmfilter.io.sources import PIPE_PREFIX, ShardSource

log = logging.getLogger(__name__)

UNSAFE_KEY_PREFIX = "__unsafe__@"
_ABSOLUTE = re.compile(r"^([/\\]|[A-Za-z]:[/\\])")  # posix, UNC and drive-letter roots


class _HeaderWatch:
    """Stands in for TarFile.fileobj: remembers the last header-sized read and bounds every read.

    tarfile ends iteration quietly when a header after the first one is cut short, missing or
    garbage, so a shard cut at a member boundary would look complete. A proper archive ends with
    a zero block; that is checked here. tarfile itself reads pax and GNU long-name headers whole,
    whatever size they declare; reads over the member cap are refused here."""

    def __init__(self, stream: Any, already_ended: bool, max_read: int):
        self._stream = stream
        self._max_read = max_read
        # tarfile read the first header before we could wrap it; None there means an empty archive
        self.last_block: bytes | None = tarfile.NUL * tarfile.BLOCKSIZE if already_ended else None

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._max_read:
            raise _OversizedRead(size)
        data = self._stream.read(size)
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def ended_with_marker(self) -> bool:
        return self.last_block == tarfile.NUL * tarfile.BLOCKSIZE


class _OversizedRead(Exception):
    def __init__(self, size: int):
        super().__init__(f"a tar header declares {size} bytes of extended header data")
        self.size = size


class _TarBreak(Exception):
    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(detail)
        self.where = where
        self.reason = reason
        self.detail = detail


@dataclass
class _Group:
    """The consecutive members of one key (or one unsafe member on its own)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    problem: SampleProblem | None = None

    def flag(self, problem: SampleProblem) -> None:
        self.problem = self.problem or problem


def read_tar(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = SampleBuilder(source, options)
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(_open_stream(source))
            raw, damage = _checked_stream(raw, source)
            tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r|*"))
        except GzipDamaged as exc:  # a pipe's gzip data failed its check before the first member
            yield builder.broken(f"{TRUNCATED_KEY_PREFIX}0", errors.TRUNCATED_SHARD, exc.damage.detail)
            return
        except Exception as exc:  # anything at all: the shard is one error row, the run goes on
            yield builder.broken(
                "__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}"
            )
            return
        # header data beyond this is refused; member reads never ask for more than cap + 1
        max_read = options.max_member_bytes + tarfile.BLOCKSIZE
        watch = _HeaderWatch(tar.fileobj, already_ended=tar.firstmember is None, max_read=max_read)
        tar.fileobj = watch
        try:
            for group in _grouped_members(tar, builder, damage):
                yield builder.from_members(group.key, group.members, group.problem, tuple(group.seen))
        except _TarBreak as brk:
            yield builder.broken(TRUNCATED_KEY_PREFIX + brk.where, brk.reason, brk.detail)
            return
        if not watch.ended_with_marker:
            yield builder.broken(
                f"{TRUNCATED_KEY_PREFIX}{tar.offset}",
                errors.TRUNCATED_SHARD,
                f"{source.url}: no end-of-archive marker at byte {tar.offset} (cut short or corrupt header)",
            )
        elif source.is_pipe and isinstance(raw, CheckedGzip):  # read once: its last trailer is checked now
            late = drain(raw)
            if late is not None:
                yield builder.broken(
                    f"{TRUNCATED_KEY_PREFIX}{late.offset}",
                    errors.TRUNCATED_SHARD,
                    f"{late.detail} (found at the end of a stream read once: the pairs before it were read from it)",
                )


def _checked_stream(raw: IO[bytes], source: ShardSource) -> tuple[IO[bytes], StreamDamage | None]:
    """The stream tarfile reads, and where it is damaged. gzip data that can be read twice is checked end
    to end first, then read as it is (every byte of a damaged member arrives, and its pairs are marked);
    gzip data read once (a pipe) is decompressed with its checks on the way."""
    is_gzip, raw = sniff(raw)
    if not is_gzip:
        return raw, None
    if source.is_pipe:
        return CheckedGzip(raw, source.url), None
    damage = find_damage(lambda: _open_stream(source), source.url)
    return CheckedGzip(raw, source.url, strict=False), damage


def _grouped_members(
    tar: tarfile.TarFile, builder: SampleBuilder, damage: StreamDamage | None = None
) -> Iterator[_Group]:
    """One group per run of consecutive members sharing a key, plus one per unsafe member name; a
    group with a member reaching into the ``damage`` of a compressed stream is a ``truncated_shard`` row."""
    wanted = builder.wanted_extensions()
    cap = builder.options.max_member_bytes
    group: _Group | None = None
    iterator = iter(tar)
    while True:
        try:
            member = next(iterator)
        except StopIteration:
            break
        except _OversizedRead as exc:
            detail = f"tar header at byte {tar.offset} declares {exc.size} bytes of header data, over the cap: shard ends here"
            raise _TarBreak(str(tar.offset), errors.MEMBER_TOO_LARGE, detail) from exc
        except Exception as exc:  # any damage ends the stream; it is reported, not raised
            raise _TarBreak(
                str(tar.offset), errors.TRUNCATED_SHARD, f"tar stream broke after byte {tar.offset}: {exc}"
            ) from exc
        tar.members = []  # tarfile keeps every header it saw; a 30k-member shard does not need that
        if member.isdir():
            continue
        unsafe = _unsafe_name(member.name)
        parts = None if unsafe else split_member_name(member.name)
        kind_problem = _unsafe_kind(member)
        if unsafe or (kind_problem and parts is None):  # a row of its own: it belongs to no usable key
            if group is not None:
                yield group
                group = None
            yield _Group(f"{UNSAFE_KEY_PREFIX}{member.offset}", problem=unsafe or kind_problem)
            continue
        if parts is None:
            continue  # README, .DS_Store, ._resource forks: not part of any pair
        member_key, ext = parts
        if group is None or member_key != group.key:  # the previous sample is complete: hand it out first
            if group is not None:
                yield group
            group = _Group(member_key)
        group.seen.append(ext)
        if damage is not None and member.offset_data + member.size > damage.offset:
            group.flag(SampleProblem(errors.TRUNCATED_SHARD, damage.detail))  # its bytes are not trusted
        if kind_problem:
            group.flag(kind_problem)
        elif group.problem is not None and group.problem.reason == errors.TRUNCATED_SHARD:
            continue  # not read: nothing of it is used
        elif ext not in wanted:
            continue  # never read: stream mode skips its data
        elif member.size > cap:
            group.flag(too_large(f"tar member {member.name!r}", member.size, cap))
        else:
            try:
                # bounded by the header's size (<= cap): buffered readers allocate what is asked for
                group.members[ext] = tar.extractfile(member).read(member.size + 1)
            except Exception as exc:  # any damage ends the stream; it is reported, not raised
                detail = f"member {member.name!r} is cut short: {exc} (sample {group.key!r} lost)"
                raise _TarBreak(member.name, errors.TRUNCATED_SHARD, detail) from exc
    if group is not None:
        yield group


def _unsafe_name(name: str) -> SampleProblem | None:
    """Absolute names and ``..`` components could make an extraction write outside its folder."""
    if _ABSOLUTE.match(name) or ".." in name.replace("\\", "/").split("/"):
        return SampleProblem(errors.UNSAFE_MEMBER, f"tar member {name!r} has an absolute or '..' path: not read")
    return None


def _unsafe_kind(member: tarfile.TarInfo) -> SampleProblem | None:
    if member.isfile():
        return None
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        return SampleProblem(
            errors.UNSAFE_MEMBER, f"tar member {member.name!r} is a {kind} to {member.linkname!r}: not followed"
        )
    kind = (
        "character device"
        if member.ischr()
        else "block device"
        if member.isblk()
        else "FIFO"
        if member.isfifo()
        else "special member"
    )
    return SampleProblem(errors.UNSAFE_MEMBER, f"tar member {member.name!r} is a {kind}: not read")


@contextlib.contextmanager
def _open_stream(source: ShardSource) -> Iterator[IO[bytes]]:
    """A binary read stream: fsspec for URLs, a subprocess for opt-in ``pipe:`` specs."""
    if not source.is_pipe:
        with open_shard_file(source.url) as fh:
            yield fh
        return
    proc = subprocess.Popen(source.url[len(PIPE_PREFIX) :], shell=True, stdout=subprocess.PIPE)
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            log.warning("%s exited with status %s", source.url, proc.returncode)
