"""ShardSource -> Iterator[Sample] for WebDataset tars, parquet files and image folders.

Readers never raise for one bad sample or a damaged shard: every problem becomes a Sample with
``error`` set (codes in :mod:`mlmfilter.errors`), so every pair is counted. Image bytes are
passed through undecoded (decoding belongs to :mod:`mlmfilter.imaging`).

Layouts
- tar: img2dataset / DataComp WebDataset shards, members ``KEY.jpg|jpeg|png|webp``, ``KEY.txt``,
  ``KEY.json``. The key is the member path up to the first dot of its basename (directory prefix
  kept, as in webdataset). The tar is streamed, never held in memory.
- parquet: one row per pair; an image bytes column (``jpg``/``image``/``image_bytes``..., plain
  binary or HF-datasets ``{bytes, path}`` struct) or an image path column (relative to the
  parquet's folder), a caption column, optional ``uid`` and ``key`` columns.
- folder: images plus ``captions.jsonl`` / ``captions.csv`` / ``captions.tsv`` (an image-file
  field and a caption field per row; several rows per image give keys ``stem#0``, ``stem#1``...),
  or, with no captions file, WebDataset-style sidecars (``KEY.jpg`` beside ``KEY.txt``/``KEY.json``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import posixpath
import subprocess
import tarfile
from collections import defaultdict
from typing import IO, Any, Iterator, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, field_validator

from mlmfilter import errors
from mlmfilter.io.sources import PIPE_PREFIX, ShardSource, shard_basename
from mlmfilter.io.uid import derive_uid, normalize_uid
from mlmfilter.sample import Sample

log = logging.getLogger(__name__)

IMAGE_BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "img", "bytes")
IMAGE_PATH_COLUMNS = ("image_path", "path", "file", "file_name", "filename", "image_file", "image", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")
CAPTIONS_FILES = ("captions.jsonl", "captions.csv", "captions.tsv")
TRUNCATED_KEY_PREFIX = "__truncated__@"


class ReadOptions(BaseModel):
    """How to find images, captions, uids and keys. Column names left as None are auto-detected."""

    model_config = ConfigDict(extra="forbid")

    caption_key: str = "txt"  # tar / sidecar extension of the caption
    metadata_key: str = "json"  # tar / sidecar extension of the metadata
    image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # in order of preference
    image_column: str | None = None  # parquet: image bytes (binary or {bytes, path} struct)
    image_path_column: str | None = None  # parquet/captions file: image path
    caption_column: str | None = None
    uid_column: str | None = None
    key_column: str | None = None
    captions_file: str | None = None  # folder: name of the captions table inside it
    max_caption_chars: int = 10_000
    parquet_batch_rows: int = 256  # rows per arrow batch: bounds memory with large image bytes

    @field_validator("image_exts")
    @classmethod
    def _lower_case(cls, exts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(ext.lower().lstrip(".") for ext in exts)  # member extensions are compared lower-cased


def read_shard(source: ShardSource, options: ReadOptions | None = None) -> Iterator[Sample]:
    """Every pair of ``source`` as a Sample, in shard order. Never raises for bad input."""
    options = options or ReadOptions()
    readers = {"tar": _read_tar, "parquet": _read_parquet, "folder": _read_folder}
    return readers[source.format](source, options)


# -- building one sample --------------------------------------------------------------------------


class _SampleBuilder:
    """Turns the raw parts of one pair into a Sample, flagging the first problem found."""

    def __init__(self, source: ShardSource, options: ReadOptions):
        self.source = source
        self.shard_name = shard_basename(source.url)
        self.options = options

    def uid_for(self, key: str, candidate: Any = None) -> str:
        return normalize_uid(candidate) or derive_uid(self.shard_name, key)

    def broken(self, key: str, reason: str, detail: str) -> Sample:
        """A row standing for pairs that could not be read at all."""
        return Sample(uid=self.uid_for(key), shard=self.source.id, key=key).fail(reason, detail)

    def build(
        self,
        key: str,
        *,
        image_bytes: bytes | None,
        image_format: str | None,
        caption: bytes | str | None,
        meta: Mapping[str, Any] | None = None,
        uid: Any = None,
        missing_image_detail: str = "",
        metadata_error: str | None = None,
    ) -> Sample:
        meta = dict(meta or {})
        sample = Sample(
            uid=self.uid_for(key, uid if uid is not None else meta.get("uid")),
            shard=self.source.id,
            key=key,
            image_bytes=image_bytes,
            image_format=image_format,
            meta=meta,
        )
        if image_bytes is None:
            sample.fail(errors.MISSING_IMAGE, missing_image_detail or f"{key}: no image")
        if caption is None:
            sample.fail(errors.MISSING_CAPTION, f"{key}: no caption")
            return sample
        if metadata_error:
            sample.fail(errors.BAD_METADATA, metadata_error)
        text, valid_utf8 = _caption_text(caption if isinstance(caption, (str, bytes)) else str(caption))
        if not text.strip():
            sample.fail(errors.EMPTY_CAPTION, f"{key}: caption is empty or whitespace")
        if not valid_utf8:
            sample.fail(errors.CAPTION_ENCODING, f"{key}: caption is not valid UTF-8 (decoded with replacement)")
        limit = self.options.max_caption_chars
        if len(text) > limit:
            sample.fail(errors.CAPTION_TOO_LONG, f"{key}: caption has {len(text)} characters, cut to {limit}")
            text = text[:limit]
        sample.caption = text
        return sample

    def from_members(self, key: str, members: Mapping[str, bytes]) -> Sample:
        """A sample from WebDataset-style parts ``{ext: bytes}`` (tar members or sidecar files)."""
        opts = self.options
        image_ext = next((ext for ext in opts.image_exts if ext in members), None)
        meta, metadata_error = _parse_metadata(members.get(opts.metadata_key), key)
        return self.build(
            key,
            image_bytes=members[image_ext] if image_ext else None,
            image_format=image_ext,
            caption=members.get(opts.caption_key),
            meta=meta,
            missing_image_detail=f"{key}: no {'/'.join(opts.image_exts)} member (found: {', '.join(sorted(members))})",
            metadata_error=metadata_error,
        )


def _caption_text(caption: bytes | str) -> tuple[str, bool]:
    """(text, was valid UTF-8). Strings may carry surrogate escapes from a file decoded with
    errors="surrogateescape"; those are bytes that were not UTF-8."""
    if isinstance(caption, str):
        try:
            caption.encode("utf-8")
            return caption, True
        except UnicodeEncodeError:
            caption = caption.encode("utf-8", "surrogateescape")
    try:
        return caption.decode("utf-8"), True
    except UnicodeDecodeError:
        return caption.decode("utf-8", errors="replace"), False


def _parse_metadata(raw: bytes | None, key: str) -> tuple[dict[str, Any], str | None]:
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"{key}: json does not parse: {exc}"
    if not isinstance(meta, dict):
        return {}, f"{key}: json is a {type(meta).__name__}, expected an object"
    return meta, None


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension split: ``dir/000001.seg.png`` -> (``dir/000001``, ``seg.png``).

    None for names with no extension or a hidden basename (``._foo.jpg``, ``.DS_Store``)."""
    directory, _, basename = name.rpartition("/")
    stem, dot, ext = basename.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


# -- tar ------------------------------------------------------------------------------------------


class _HeaderWatch:
    """Stands in for TarFile.fileobj and remembers the last header-sized read.

    tarfile ends iteration quietly when a header after the first one is cut short, missing or
    garbage, so a shard cut at a member boundary would look complete. A proper archive ends with
    a zero block; that is checked here."""

    def __init__(self, stream: Any, already_ended: bool):
        self._stream = stream
        # tarfile read the first header before we could wrap it; None there means an empty archive
        self.last_block: bytes | None = tarfile.NUL * tarfile.BLOCKSIZE if already_ended else None

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def ended_with_marker(self) -> bool:
        return self.last_block == tarfile.NUL * tarfile.BLOCKSIZE


class _TarBreak(Exception):
    def __init__(self, where: str, detail: str):
        super().__init__(detail)
        self.where = where
        self.detail = detail


def _read_tar(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = _SampleBuilder(source, options)
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(_open_stream(source))
            tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r|*"))
        except Exception as exc:  # anything at all: the shard is one error row, the run goes on
            yield builder.broken("__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}")
            return
        watch = _HeaderWatch(tar.fileobj, already_ended=tar.firstmember is None)
        tar.fileobj = watch
        try:
            for key, members in _grouped_members(tar):
                yield builder.from_members(key, members)
        except _TarBreak as brk:
            yield builder.broken(TRUNCATED_KEY_PREFIX + brk.where, errors.TRUNCATED_SHARD, brk.detail)
            return
        if not watch.ended_with_marker:
            yield builder.broken(
                f"{TRUNCATED_KEY_PREFIX}{tar.offset}",
                errors.TRUNCATED_SHARD,
                f"{source.url}: no end-of-archive marker at byte {tar.offset} (cut short or corrupt header)",
            )


def _grouped_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key."""
    key: str | None = None
    members: dict[str, bytes] = {}
    iterator = iter(tar)
    while True:
        try:
            member = next(iterator)
        except StopIteration:
            break
        except Exception as exc:  # any damage ends the stream; it is reported, not raised
            raise _TarBreak(str(tar.offset), f"tar stream broke after byte {tar.offset}: {exc}") from exc
        tar.members = []  # tarfile keeps every header it saw; a 30k-member shard does not need that
        parts = split_member_name(member.name) if member.isfile() else None
        if parts is None:
            continue
        member_key, ext = parts
        if member_key != key:  # the previous sample is complete: hand it out before reading on
            if key is not None:
                yield key, members
            key, members = member_key, {}
        try:
            members[ext] = tar.extractfile(member).read()
        except Exception as exc:  # any damage ends the stream; it is reported, not raised
            raise _TarBreak(member.name, f"member {member.name!r} is cut short: {exc} (sample {key!r} lost)") from exc
    if key is not None:
        yield key, members


@contextlib.contextmanager
def _open_stream(source: ShardSource) -> Iterator[IO[bytes]]:
    """A binary read stream: fsspec for URLs, a subprocess for opt-in ``pipe:`` specs."""
    if not source.is_pipe:
        with fsspec.open(source.url, "rb") as fh:
            yield fh
        return
    proc = subprocess.Popen(source.url[len(PIPE_PREFIX) :], shell=True, stdout=subprocess.PIPE)
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            log.warning("%s exited with status %s", source.url, proc.returncode)


# -- parquet --------------------------------------------------------------------------------------


class _ParquetColumns:
    """Which parquet columns hold what, from options or by name and type."""

    def __init__(self, schema: pa.Schema, options: ReadOptions):
        names = set(schema.names)

        def pick(explicit: str | None, candidates: tuple[str, ...], accept) -> str | None:
            if explicit is not None:
                if explicit not in names:
                    raise KeyError(f"column {explicit!r} not found (columns: {', '.join(schema.names)})")
                return explicit
            return next((c for c in candidates if c in names and accept(schema.field(c).type)), None)

        self.image = pick(options.image_column, IMAGE_BYTES_COLUMNS, _is_image_bytes_type)
        self.image_path = pick(options.image_path_column, IMAGE_PATH_COLUMNS, _is_text_type)
        if self.image_path == self.image:
            self.image_path = None
        self.caption = pick(options.caption_column, CAPTION_COLUMNS, lambda t: _is_text_type(t) or _is_binary_type(t))
        self.uid = pick(options.uid_column, ("uid",), lambda t: True)
        self.key = pick(options.key_column, ("key", "__key__"), lambda t: True)
        used = {self.image, self.image_path, self.caption}
        self.meta = [
            name for name in schema.names if name not in used and not _is_image_bytes_type(schema.field(name).type)
        ]
        if self.image is None and self.image_path is None:
            raise KeyError(
                f"no image bytes column ({'/'.join(IMAGE_BYTES_COLUMNS)}) or image path column "
                f"({'/'.join(IMAGE_PATH_COLUMNS)}); columns: {', '.join(schema.names)}"
            )


def _is_binary_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_bytes_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return _is_binary_type(t)


def _read_parquet(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = _SampleBuilder(source, options)
    with contextlib.ExitStack() as stack:
        try:
            parquet = pq.ParquetFile(stack.enter_context(fsspec.open(source.url, "rb")))
            columns = _ParquetColumns(parquet.schema_arrow, options)
        except Exception as exc:
            yield builder.broken("__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}")
            return
        images = _ImagePathResolver(source.url)
        group_start = 0
        for group in range(parquet.num_row_groups):
            group_end = group_start + parquet.metadata.row_group(group).num_rows
            row = group_start
            try:  # one damaged row group loses its own rows only
                for batch in parquet.iter_batches(batch_size=options.parquet_batch_rows, row_groups=[group]):
                    yield from _parquet_batch_samples(batch, row, columns, builder, images)
                    row += batch.num_rows
            except Exception as exc:
                yield builder.broken(
                    f"{TRUNCATED_KEY_PREFIX}row{row}",
                    errors.TRUNCATED_SHARD,
                    f"{source.url}: row group {group} unreadable at row {row} ({group_end - row} rows lost): {exc}",
                )
            group_start = group_end


def _parquet_batch_samples(
    batch: pa.RecordBatch, first_row: int, columns: _ParquetColumns, builder: _SampleBuilder, images: "_ImagePathResolver"
) -> Iterator[Sample]:
    def column(name: str | None) -> list[Any]:
        return batch.column(name).to_pylist() if name else [None] * batch.num_rows

    image_values, path_values = column(columns.image), column(columns.image_path)
    captions, uids, keys = column(columns.caption), column(columns.uid), column(columns.key)
    meta_rows = batch.select(columns.meta).to_pylist() if columns.meta else [{}] * batch.num_rows
    for i in range(batch.num_rows):
        key = str(keys[i]) if keys[i] is not None else str(first_row + i)
        image_bytes, image_format, path = _split_image_value(image_values[i], columns.image)
        path = path or path_values[i]
        detail = f"{key}: image column {columns.image or columns.image_path!r} is null"
        if image_bytes is None and path:
            image_bytes, detail = images.read(path)
            image_format = image_format or _extension(path)
        yield builder.build(
            key,
            image_bytes=image_bytes,
            image_format=image_format or sniff_image_format(image_bytes),
            caption=captions[i] if columns.caption else None,
            meta=meta_rows[i],
            uid=uids[i],
            missing_image_detail=detail,
        )


def _split_image_value(value: Any, column: str | None) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, format from the column name, path) from a plain binary or HF {bytes, path} value."""
    if isinstance(value, dict):
        path = value.get("path")
        return value.get("bytes"), _extension(path) if path else None, path
    fmt = column if column in ("jpg", "jpeg", "png", "webp") else None
    return value, fmt, None


class _ImagePathResolver:
    """Reads image files named by relative (to the shard's folder) or absolute paths/URLs."""

    def __init__(self, shard_url: str):
        self.fs, shard_path = fsspec.core.url_to_fs(shard_url)
        self.base = posixpath.dirname(shard_path.rstrip("/")) if "/" in shard_path else ""

    def read(self, path: str) -> tuple[bytes | None, str]:
        try:
            if "://" in path:
                with fsspec.open(path, "rb") as fh:
                    return fh.read(), ""
            full = path if path.startswith("/") else posixpath.join(self.base, path)
            return self.fs.cat_file(full), ""
        except (OSError, ValueError) as exc:
            return None, f"image file {path!r} cannot be read: {type(exc).__name__}: {exc}"


def _extension(path: str) -> str | None:
    _, dot, ext = posixpath.basename(path).rpartition(".")
    return ext.lower() if dot and ext else None


_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def sniff_image_format(data: bytes | None) -> str | None:
    """File extension from the leading magic bytes, for image bytes that came without a name."""
    if not data:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


# -- folder ---------------------------------------------------------------------------------------


def _read_folder(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = _SampleBuilder(source, options)
    try:
        fs, root = fsspec.core.url_to_fs(source.url)
        root = root.rstrip("/")
        files = sorted(posixpath.relpath(p, root) if root else p for p in fs.find(root))
        table = _find_captions_table(files, options)
        rows = _parse_captions_table(fs.cat_file(f"{root}/{table}"), table) if table else None
    except Exception as exc:
        yield builder.broken("__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}")
        return
    exts = {ext.lower() for ext in options.image_exts}
    images = [f for f in files if (_extension(f) or "") in exts]
    if rows is None:
        yield from _folder_sidecar_samples(fs, root, files, builder)
    else:
        yield from _folder_table_samples(fs, root, images, rows, table, builder)


def _find_captions_table(files: list[str], options: ReadOptions) -> str | None:
    if options.captions_file is not None:
        if options.captions_file not in files:
            raise FileNotFoundError(f"captions file {options.captions_file!r} not in the folder")
        return options.captions_file
    return next((name for name in CAPTIONS_FILES if name in files), None)


def _parse_captions_table(raw: bytes, name: str) -> list[dict[str, Any] | str]:
    """Rows as dicts; a jsonl line that does not parse stays a str (reported per row).

    Decoded with surrogateescape so one non-UTF-8 caption does not spoil the whole file."""
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if name.endswith(".jsonl"):
        rows: list[dict[str, Any] | str] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = line
            rows.append(row if isinstance(row, dict) else line)
        return rows
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if name.endswith(".tsv") else ","))


def _folder_sidecar_samples(fs: Any, root: str, files: list[str], builder: _SampleBuilder) -> Iterator[Sample]:
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for rel in files:
        parts = split_member_name(rel)
        if parts:
            groups[parts[0]][parts[1]] = rel
    wanted = {*builder.options.image_exts, builder.options.caption_key, builder.options.metadata_key}
    for key in sorted(groups):
        members = {ext: fs.cat_file(f"{root}/{rel}") for ext, rel in groups[key].items() if ext in wanted}
        yield builder.from_members(key, members)


def _folder_table_samples(
    fs: Any, root: str, images: list[str], rows: list[dict[str, Any] | str], table: str, builder: _SampleBuilder
) -> Iterator[Sample]:
    options = builder.options
    by_path = set(images)
    by_basename: dict[str, list[str]] = defaultdict(list)
    for rel in images:
        by_basename[posixpath.basename(rel)].append(rel)

    def resolve(value: str) -> str | None:
        value = value.replace("\\", "/")
        value = value[2:] if value.startswith("./") else value
        if value in by_path:
            return value
        same_name = by_basename.get(posixpath.basename(value), [])
        return same_name[0] if len(same_name) == 1 else None

    # (key stem, image rel path or None, row) for every row; then keys made unique per image.
    entries: list[tuple[str, str | None, dict[str, Any] | str]] = []
    captioned: set[str] = set()
    image_field = caption_field = None
    for line_no, row in enumerate(rows, start=1):
        if isinstance(row, str):
            entries.append((f"{table}:{line_no}", None, row))
            continue
        image_field = image_field or _first_field(row, (options.image_path_column,) + IMAGE_PATH_COLUMNS)
        caption_field = caption_field or _first_field(row, (options.caption_column,) + CAPTION_COLUMNS)
        value = str(row.get(image_field) or "") if image_field else ""
        rel = resolve(value) if value else None
        if rel:
            captioned.add(rel)
        stem_source = rel or value or f"{table}:{line_no}"
        entries.append((_strip_extension(stem_source), rel, row))
    entries.extend((_strip_extension(rel), rel, {}) for rel in images if rel not in captioned)

    per_stem: dict[str, int] = defaultdict(int)
    for stem, _, _ in entries:
        per_stem[stem] += 1
    seen: dict[str, int] = defaultdict(int)
    keyed = []
    for stem, rel, row in entries:
        key = stem if per_stem[stem] == 1 else f"{stem}#{seen[stem]}"
        seen[stem] += 1
        keyed.append((key, rel, row))
    keyed.sort(key=lambda item: item[0])

    for key, rel, row in keyed:
        if isinstance(row, str):
            yield builder.broken(key, errors.BAD_METADATA, f"{key}: captions row does not parse: {row[:200]!r}")
            continue
        has_row = bool(row)
        image_bytes = fs.cat_file(f"{root}/{rel}") if rel else None
        meta = {k: v for k, v in row.items() if k not in (image_field, caption_field, options.uid_column or "uid")}
        yield builder.build(
            key,
            image_bytes=image_bytes,
            image_format=_extension(rel) if rel else None,
            caption=row.get(caption_field) if has_row and caption_field else None,
            meta=meta,
            uid=row.get(options.uid_column or "uid") if has_row else None,
            missing_image_detail=f"{key}: image {row.get(image_field)!r} listed in {table} is not in the folder"
            if has_row
            else "",
        )


def _first_field(row: Mapping[str, Any], candidates: tuple[str | None, ...]) -> str | None:
    return next((c for c in candidates if c and c in row), None)


def _strip_extension(path: str) -> str:
    directory, _, basename = path.rpartition("/")
    stem = basename.split(".", 1)[0] or basename
    return f"{directory}/{stem}" if directory else stem
