"""Image folders: images plus a captions table, or WebDataset-style sidecar files.

The captions table is ``captions.jsonl|csv|tsv`` or Hugging Face ``imagefolder``'s
``metadata.jsonl|csv`` (a ``file_name`` field and a caption field such as ``text``), or the file
named by ``captions_file``; its fields are matched in any case.

Every file is read through :class:`DatasetFiles`: a FIFO or device named like an image is a
``not_a_regular_file`` row, a symlink leading out of the folder an ``unsafe_path`` row, and a
captions row naming a path outside the folder (or a URL) an ``unsafe_path`` row, unless the user
allows paths outside. Symlinked directories are not descended into."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import defaultdict
from typing import Any, Iterator, Mapping

import fsspec

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers.files import DatasetFiles, is_local, open_regular_file
from mlmfilter.io.readers.options import CAPTION_COLUMNS, CAPTIONS_FILES, IMAGE_PATH_COLUMNS, ReadOptions, find_column
from mlmfilter.io.readers.samples import SampleBuilder, SampleProblem, extension, split_member_name
from mlmfilter.io.sources import ShardSource

#: the metadata field naming a folder sample's image file (as Hugging Face imagefolder names it)
FILE_NAME = "file_name"


class CaptionsTableError(ValueError):
    """A captions table that cannot be read as its author meant (an unbalanced quote): refused whole."""


def read_folder(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = SampleBuilder(source, options)
    try:
        fs, root, files, table, rows = _open_folder(source, options)
    except Exception as exc:
        yield builder.broken("__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}")
        return
    dataset = DatasetFiles(fs, root, options)
    if rows is None:
        yield from _sidecar_samples(dataset, files, builder)
    else:
        yield from _table_samples(dataset, _images(files, options), rows, table, builder)


def check_captions_table(source: ShardSource, options: ReadOptions) -> None:
    """Refuse (:class:`CaptionsTableError`, naming the file and line) an image folder whose captions table
    would be misread, before a run starts; the reader would make it one ``unreadable_shard`` row."""
    try:
        _open_folder(source, options)
    except CaptionsTableError as exc:
        raise CaptionsTableError(f"input {source.url}: {exc}") from None
    except Exception:  # anything else is the reader's to report, as a row
        pass


def _open_folder(source: ShardSource, options: ReadOptions):
    """(filesystem, root, files, captions table name or None, its rows or None)."""
    fs, root = fsspec.core.url_to_fs(source.url)
    root = root.rstrip("/")
    files = _list_files(fs, root)
    table = _find_captions_table(files, options)
    if table is None:
        return fs, root, files, None, None
    rows = _parse_captions_table(_read_table(fs, f"{root}/{table}"), table, _images(files, options))
    return fs, root, files, table, rows


def _images(files: list[str], options: ReadOptions) -> list[str]:
    exts = set(options.image_exts)
    return [f for f in files if (extension(f) or "") in exts]


def _list_files(fs: Any, root: str) -> list[str]:
    """Sorted paths relative to ``root`` of everything that is not a directory."""
    if is_local(fs):  # os.walk does not follow symlinked directories (fsspec's find does, loops included)
        found = [
            posixpath.relpath(posixpath.join(d.replace(os.sep, "/"), name), root)
            for d, _, names in os.walk(root, onerror=_raise, followlinks=False)
            for name in names
        ]
    else:
        found = [posixpath.relpath(p, root) if root else p for p in fs.find(root)]
    return sorted(found)


def _raise(exc: OSError) -> None:
    raise exc  # an unlistable subfolder must not silently lose its pairs


def _read_table(fs: Any, path: str) -> bytes:
    if is_local(fs):
        with open_regular_file(path) as fh:
            return fh.read()
    return fs.cat_file(path)


def _find_captions_table(files: list[str], options: ReadOptions) -> str | None:
    if options.captions_file is not None:
        if options.captions_file not in files:
            raise FileNotFoundError(f"captions file {options.captions_file!r} not in the folder")
        return options.captions_file
    return next((name for name in CAPTIONS_FILES if name in files), None)


def _parse_captions_table(raw: bytes, name: str, images: list[str] = ()) -> list[dict[str, Any] | str]:
    """Rows as dicts; a jsonl line that does not parse stays a str (reported per row).

    Decoded with surrogateescape so one non-UTF-8 caption does not spoil the whole file. A csv/tsv
    table is refused when it reads as an unbalanced quote would make it (:func:`_csv_rows`)."""
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if name.endswith(".jsonl"):
        rows: list[dict[str, Any] | str] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a hostile, deeply nested line
                row = line
            rows.append(row if isinstance(row, dict) else line)
        return rows
    return _csv_rows(text, name, images)


def _csv_rows(text: str, name: str, images: list[str]) -> list[dict[str, Any]]:
    """The rows of a csv/tsv captions table, refused (:class:`CaptionsTableError`) where a quote is unbalanced.

    One stray quote turns the rest of the file into one caption, so the rule (DEVELOPERS.md, "A captions
    table with an unbalanced quote") is: the file is refused, naming the line where the quoted field
    opens, when the csv module finds the quoting broken (strict mode: the file ends inside a quoted
    field, or text follows a closing quote), or when a field spans line breaks and what it swallowed
    names an image of the folder, or the table then holds fewer than half as many rows as the folder
    holds images. A quoted caption with a line break inside, in an otherwise sound table, is kept."""
    names = {n for rel in images for n in (rel, posixpath.basename(rel))}
    delimiter = "\t" if name.endswith(".tsv") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    spanning: tuple[int, int] | None = None  # (first line, lines) of the first record over several lines
    last_line = 0
    while True:
        start = last_line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise CaptionsTableError(
                f"{name}:{start}: the quoting of the record starting on this line is broken ({exc}, at line "
                f"{reader.line_num}): an unbalanced quote would make the rest of the file one caption; "
                'fix it (a quote inside a quoted caption is written twice: "")'
            ) from None
        last_line = reader.line_num
        if not record:  # a blank line
            continue
        if header is None:
            header = record
            continue
        row: dict[str, Any] = dict(zip(header, record + [None] * (len(header) - len(record))))
        if len(record) > len(header):
            row[None] = record[len(header) :]  # type: ignore[index]  # as csv.DictReader keeps extra fields
        lines = last_line - start + 1
        if lines > 1:
            spanning = spanning or (start, lines)
            swallowed = _named_image(record, names, delimiter)
            if swallowed is not None:
                raise CaptionsTableError(
                    f"{name}:{start}: a quoted field opens here and runs over {lines} lines, taking in the "
                    f"line that names {swallowed!r}: an unbalanced quote? The table is refused; fix the quoting"
                )
        rows.append(row)
    if spanning is not None and images and len(rows) < len(images) / 2:
        start, lines = spanning
        raise CaptionsTableError(
            f"{name}:{start}: a quoted field opens here and runs over {lines} lines, and the table holds "
            f"{len(rows)} rows for {len(images)} images: an unbalanced quote? The table is refused; fix the quoting"
        )
    return rows


def _named_image(record: list[str], names: set[str], delimiter: str) -> str | None:
    """An image name that a line inside one of the record's multi-line fields holds as a field."""
    for value in record:
        if "\n" not in value and "\r" not in value:
            continue
        for line in value.splitlines()[1:]:
            for piece in line.split(delimiter):
                piece = piece.strip().strip('"').strip()
                piece = piece[2:] if piece.startswith("./") else piece
                if piece in names:
                    return piece
    return None


def _sidecar_samples(dataset: DatasetFiles, files: list[str], builder: SampleBuilder) -> Iterator[Sample]:
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for rel in files:
        parts = split_member_name(rel)
        if parts:
            groups[parts[0]][parts[1]] = rel
    wanted = builder.wanted_extensions()
    for key in sorted(groups):
        members: dict[str, bytes] = {}
        problem = None
        for ext, rel in groups[key].items():
            if ext not in wanted:
                continue
            try:
                members[ext] = dataset.read(rel)
            except SampleProblem as exc:
                problem = problem or exc
            except Exception as exc:  # vanished or a broken symlink: that part is missing
                problem = problem or SampleProblem(
                    _missing_reason(ext, builder.options), f"{rel!r} cannot be read: {exc}"
                )
        sample = builder.from_members(key, members, problem, tuple(groups[key]))
        if sample.image_format in groups[key]:  # where the image came from, kept in the metadata
            sample.meta.setdefault(FILE_NAME, groups[key][sample.image_format])
        yield sample


def _missing_reason(ext: str, options: ReadOptions) -> str:
    if ext == options.member_caption_key:
        return errors.MISSING_CAPTION
    return errors.BAD_METADATA if ext == options.metadata_key else errors.MISSING_IMAGE


def _table_samples(
    dataset: DatasetFiles, images: list[str], rows: list[dict[str, Any] | str], table: str, builder: SampleBuilder
) -> Iterator[Sample]:
    options = builder.options
    by_path = set(images)
    by_basename: dict[str, list[str]] = defaultdict(list)
    for rel in images:
        by_basename[posixpath.basename(rel)].append(rel)

    def resolve(value: str) -> str | None:
        """The folder file a row names: its path, or a unique file of that name; refused outside the folder."""
        value = value.replace("\\", "/")
        value = value[2:] if value.startswith("./") else value
        if value in by_path:
            return value
        _, path = dataset.locate(value)  # SampleProblem(unsafe_path) for paths outside / URLs not allowed
        if dataset.is_inside(value):
            rel = dataset.relative(path)
            if rel in by_path:
                return rel
            same_name = by_basename.get(posixpath.basename(value), [])
            return same_name[0] if len(same_name) == 1 else None
        return value  # outside the folder, and the user allows it: read as named

    # (key stem, image name or None, row, problem) for every row; then keys made unique per image.
    entries: list[tuple[str, str | None, dict[str, Any] | str, SampleProblem | None]] = []
    captioned: set[str] = set()
    image_field = caption_field = None
    for line_no, row in enumerate(rows, start=1):
        if isinstance(row, str):
            entries.append((f"{table}:{line_no}", None, row, None))
            continue
        image_field = image_field or _first_field(
            row, (options.image_path_column, options.image_column) + IMAGE_PATH_COLUMNS
        )
        caption_field = caption_field or _first_field(row, (options.caption_column,) + CAPTION_COLUMNS)
        value = str(row.get(image_field) or "") if image_field else ""
        rel, problem = None, None
        try:
            rel = resolve(value) if value else None
        except SampleProblem as exc:
            problem = exc
        if rel in by_path:
            captioned.add(rel)
        stem_source = f"{table}:{line_no}" if problem else rel or value or f"{table}:{line_no}"
        entries.append((_strip_extension(stem_source), rel, row, problem))
    entries.extend((_strip_extension(rel), rel, {}, None) for rel in images if rel not in captioned)

    per_stem: dict[str, int] = defaultdict(int)
    for stem, *_ in entries:
        per_stem[stem] += 1
    seen: dict[str, int] = defaultdict(int)
    keyed = []
    for stem, rel, row, problem in entries:
        key = stem if per_stem[stem] == 1 else f"{stem}#{seen[stem]}"
        seen[stem] += 1
        keyed.append((key, rel, row, problem))
    keyed.sort(key=lambda item: item[0])

    for key, rel, row, problem in keyed:
        if isinstance(row, str):
            yield builder.broken(key, errors.BAD_METADATA, f"{key}: captions row does not parse: {row[:200]!r}")
            continue
        has_row = bool(row)
        image_bytes = None
        missing = f"{key}: image {row.get(image_field)!r} listed in {table} is not in the folder" if has_row else ""
        if rel and problem is None:
            try:
                image_bytes = dataset.read(rel)
            except SampleProblem as exc:
                problem = exc
            except Exception as exc:  # missing, unreachable, no filesystem for its protocol: this row only
                missing = f"{key}: image {rel!r} cannot be read: {type(exc).__name__}: {exc}"
        # the image's file name stays in the metadata (HF imagefolder's file_name): a reshard's json keeps it
        meta = {k: v for k, v in row.items() if k not in (caption_field, options.uid_column or "uid")}
        if rel and not (image_field and row.get(image_field)):
            meta[FILE_NAME] = rel  # an image no row lists
        yield builder.build(
            key,
            image_bytes=image_bytes,
            image_format=extension(rel) if rel else None,
            caption=row.get(caption_field) if has_row and caption_field else None,
            meta=meta,
            uid=row.get(options.uid_column or "uid") if has_row else None,
            missing_image_detail=missing,
            problem=problem,
        )


def _first_field(row: Mapping[str, Any], candidates: tuple[str | None, ...]) -> str | None:
    """The first candidate the row has, in any case (``File_Name``, ``TEXT``)."""
    names = list(row)
    return next((found for c in candidates if c and (found := find_column(names, c))), None)


def _strip_extension(path: str) -> str:
    directory, _, basename = path.rpartition("/")
    stem = basename.split(".", 1)[0] or basename
    return f"{directory}/{stem}" if directory else stem
