"""Parquet files: one row per pair, image bytes or an image path, streamed in row batches."""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers.files import DatasetFiles, open_shard_file, too_large
from mlmfilter.io.readers.options import (
    CAPTION_COLUMNS,
    IMAGE_BYTES_COLUMNS,
    IMAGE_EXTS,
    IMAGE_PATH_COLUMNS,
    URL_COLUMNS,
    ReadOptions,
    find_column,
)
from mlmfilter.io.readers.samples import (
    TRUNCATED_KEY_PREFIX,
    SampleBuilder,
    SampleProblem,
    extension,
    sniff_image_format,
)
from mlmfilter.io.sources import ShardSource


class _ParquetColumns:
    """Which parquet columns hold what: named in the options, else found by name (any case) and type."""

    def __init__(self, schema: pa.Schema, options: ReadOptions):
        names = list(schema.names)

        def pick(explicit: str | None, candidates: tuple[str, ...], accept) -> str | None:
            if explicit is not None:
                found = find_column(names, explicit)
                if found is None:
                    raise ValueError(f"column {explicit!r} not found (columns: {', '.join(names)})")
                return found
            for candidate in candidates:
                found = find_column(names, candidate)
                if found is not None and accept(schema.field(found).type):
                    return found
            return None

        explicit_image, explicit_path = options.image_column, options.image_path_column
        named = find_column(names, explicit_image) if explicit_image is not None else None
        if named is not None and _is_text_type(schema.field(named).type):  # --image-column naming file paths
            explicit_image, explicit_path = None, explicit_path or named
        self.image = (
            None
            if explicit_image is None and explicit_path
            else pick(explicit_image, IMAGE_BYTES_COLUMNS, _is_image_bytes_type)
        )
        self.image_path = pick(explicit_path, IMAGE_PATH_COLUMNS, _is_text_type)
        if self.image_path == self.image:
            self.image_path = None
        self.caption = pick(options.caption_column, CAPTION_COLUMNS, lambda t: _is_text_type(t) or _is_binary_type(t))
        self.uid = pick(options.uid_column, ("uid",), lambda t: True)
        self.key = pick(options.key_column, ("key", "__key__"), lambda t: True)
        self.url = pick(options.url_column, URL_COLUMNS, _is_text_type)
        used = {self.image, self.image_path, self.caption}
        self.meta = [name for name in names if name not in used and not _is_image_bytes_type(schema.field(name).type)]
        if self.image is None and self.image_path is None and self.url is None:
            raise ValueError(
                f"no image bytes column ({'/'.join(IMAGE_BYTES_COLUMNS)}) or image path column "
                f"({'/'.join(IMAGE_PATH_COLUMNS)}); columns: {', '.join(names)}"
            )

    @property
    def urls_only(self) -> bool:
        """A list of image URLs (a LAION metadata parquet): the images are still to be downloaded."""
        return self.image is None and self.image_path is None


def _is_binary_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_bytes_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return _is_binary_type(t)


def read_parquet(source: ShardSource, options: ReadOptions) -> Iterator[Sample]:
    builder = SampleBuilder(source, options)
    with contextlib.ExitStack() as stack:
        try:
            parquet = pq.ParquetFile(stack.enter_context(open_shard_file(source.url)))
            columns = _ParquetColumns(parquet.schema_arrow, options)
        except Exception as exc:
            yield builder.broken(
                "__unreadable__", errors.UNREADABLE_SHARD, f"{source.url}: {type(exc).__name__}: {exc}"
            )
            return
        fs, shard_path = fsspec.core.url_to_fs(source.url)
        images = DatasetFiles(
            fs, posixpath.dirname(shard_path.rstrip("/")), options
        )  # paths are relative to its folder
        group_start = 0
        for group in range(parquet.num_row_groups):
            group_end = group_start + parquet.metadata.row_group(group).num_rows
            row = group_start
            try:  # one damaged row group loses its own rows only
                for batch in parquet.iter_batches(batch_size=options.parquet_batch_rows, row_groups=[group]):
                    yield from _batch_samples(batch, row, columns, builder, images)
                    row += batch.num_rows
            except Exception as exc:
                yield builder.broken(
                    f"{TRUNCATED_KEY_PREFIX}row{row}",
                    errors.TRUNCATED_SHARD,
                    f"{source.url}: row group {group} unreadable at row {row} ({group_end - row} rows lost): {exc}",
                )
            group_start = group_end


def _batch_samples(
    batch: pa.RecordBatch, first_row: int, columns: _ParquetColumns, builder: SampleBuilder, images: DatasetFiles
) -> Iterator[Sample]:
    def column(name: str | None) -> list[Any]:
        return batch.column(name).to_pylist() if name else [None] * batch.num_rows

    image_values, path_values = column(columns.image), column(columns.image_path)
    captions, uids, keys = column(columns.caption), column(columns.uid), column(columns.key)
    meta_rows = batch.select(columns.meta).to_pylist() if columns.meta else [{}] * batch.num_rows
    cap = builder.options.max_member_bytes
    for i in range(batch.num_rows):
        key = str(keys[i]) if keys[i] is not None else str(first_row + i)
        image_bytes, image_format, path = _split_image_value(image_values[i], columns.image)
        path = path or path_values[i]
        if columns.urls_only:
            detail = f"{key}: {urls_only_detail(columns.url)}"
        else:
            detail = f"{key}: image column {columns.image or columns.image_path!r} is null"
        problem = None
        if image_bytes is not None and len(image_bytes) > cap:
            problem = too_large(f"{key}: image value", len(image_bytes), cap)
            image_bytes = None
        elif image_bytes is None and path:
            image_format = image_format or extension(path)
            try:
                image_bytes = images.read(path)
            except SampleProblem as exc:
                problem = exc
            except Exception as exc:  # missing, unreachable, no filesystem for its protocol: this row only
                detail = f"image file {path!r} cannot be read: {type(exc).__name__}: {exc}"
        yield builder.build(
            key,
            image_bytes=image_bytes,
            image_format=image_format or sniff_image_format(image_bytes),
            caption=captions[i] if columns.caption else None,
            meta=meta_rows[i],
            uid=uids[i],
            missing_image_detail=detail,
            problem=problem,
        )


def _split_image_value(value: Any, column: str | None) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, format from the column name, path) from a plain binary or HF {bytes, path} value."""
    if isinstance(value, dict):
        path = value.get("path")
        return value.get("bytes"), extension(path) if path else None, path
    fmt = column.lower() if column and column.lower() in IMAGE_EXTS else None
    return value, fmt, None


def urls_only_detail(url_column: str | None) -> str:
    return (
        f"no image bytes, only an image URL (column {url_column!r}): download the images first, e.g. "
        f"`img2dataset --input_format parquet --url_col {url_column} --output_format webdataset`, then score the tars"
    )
