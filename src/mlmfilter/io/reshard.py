"""Write new WebDataset shards holding only the kept pairs.

Two ways to say what is kept:

- :func:`reshard_selected`: the rows a selection kept, as ``(shard id, keys)`` groups in shard
  order (``kept.parquet`` is written in that order). Exactly those rows are written, also when a
  uid repeats in the inputs. Memory: the keys of one shard.
- :func:`reshard`: a set of uids (a DataComp subset ``.npy`` from elsewhere), tested per batch
  with one vectorized binary search; a uid repeated in the inputs is written once (first seen).

Output sample ``KEY`` is the pair's uid (unique across all input shards, unlike per-shard keys):
``KEY.<image ext>``, ``KEY.txt`` (the caption, or its replacement) and ``KEY.json`` (the
original json plus ``"uid"``; with a replacement caption, ``"caption"`` is updated too and the
old text kept as ``"original_caption"``). The image member's extension is always an image
format, so a source named ``x.json`` can never overwrite the sample's metadata.

The output folder is checked first: never a folder holding input shards, never a non-empty
folder unless ``overwrite`` (which removes what it does not rewrite).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mlmfilter.core.batching import batched
from mlmfilter.core.errors import Interrupted
from mlmfilter.core.locations import is_url
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers import ReadOptions, read_shard, sniff_image_format
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.uid import HALVES_DTYPE, is_sorted_halves, locate_sorted, sort_halves, uids_to_halves
from mlmfilter.io.writers import TarShardWriter, local_location, remote_location

BATCH_SIZE = 512
#: extensions a written image member may have; anything else is sniffed from the bytes
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})

#: (shard id, {key: uid} of its kept rows) -> {key: replacement caption}
CaptionsForShard = Callable[[str, Mapping[str, str]], Mapping[str, str]]


class ReshardError(ValueError):
    """The output folder or the inputs make a reshard unsafe; nothing was written."""


def reshard_selected(
    sources: Mapping[str, ShardSource],
    kept: Iterable[tuple[str, Mapping[str, str]]],
    output_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 10_000,
    captions_for: CaptionsForShard | None = None,
    read_options: ReadOptions | None = None,
    overwrite: bool = False,
    expected: int | None = None,
) -> dict[str, Any]:
    """Write the rows named by ``kept``: ``(shard id, {key: uid})`` groups, in any shard order.

    ``expected``: how many rows the selection kept, for the line a Ctrl-C prints (:class:`Interrupted`:
    the pairs in complete output shards; the shard in progress is discarded)."""
    output_dir = output_location(output_dir)
    prepare_output(output_dir, list(sources.values()), overwrite)
    counts: Counter = Counter()
    skipped_errors: Counter = Counter()
    missing: list[str] = []
    writer = TarShardWriter(output_dir, samples_per_shard=samples_per_shard)
    with _interrupt_says_what_was_written(writer, expected), writer:
        for shard_id, uid_of_key in kept:
            source = sources.get(shard_id)
            if source is None:
                counts["kept_not_found"] += len(uid_of_key)
                missing.append(f"{shard_id}: shard not registered in the run")
                continue
            replacements = captions_for(shard_id, uid_of_key) if captions_for else {}
            remaining = set(uid_of_key)
            for sample in read_shard(source, read_options):
                counts["read"] += 1
                if sample.key not in remaining:
                    counts["not_selected"] += 1
                    continue
                if not sample.ok:  # selected by an expression over error rows: nothing to write
                    skipped_errors[sample.error] += 1
                    remaining.discard(sample.key)
                    continue
                remaining.discard(sample.key)
                replacement = replacements.get(sample.key)
                counts["captions_replaced"] += replacement is not None
                writer.write(sample.uid, output_files(sample, replacement))
                counts["kept"] += 1
            if remaining:
                counts["kept_not_found"] += len(remaining)
                missing.append(
                    f"{shard_id}: {len(remaining)} kept keys not in the shard (e.g. {sorted(remaining)[0]!r})"
                )
        shards = writer.close()
    return _finish(output_dir, counts, skipped_errors, shards, overwrite, missing)


def reshard(
    sources: list[ShardSource],
    keep: np.ndarray,
    output_dir: str | os.PathLike,
    samples_per_shard: int = 10_000,
    captions: Mapping[str, str] | None = None,
    read_options: ReadOptions | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Copy the pairs whose uid is in ``keep`` into new shards under ``output_dir``.

    ``keep`` is a structured (f0, f1) uid-halves array (see :mod:`mlmfilter.io.uid`), sorted
    (an unsorted one is sorted here). ``captions`` maps uid -> replacement caption. Rows read
    with an error are never written. Returns stats: ``read``, ``kept``, ``not_selected``,
    ``duplicates``, ``captions_replaced``, ``skipped_errors`` (code -> count),
    ``kept_uids_not_found``, ``written_shards`` and ``shards`` (paths).
    """
    output_dir = output_location(output_dir)
    prepare_output(output_dir, sources, overwrite)
    keep = np.asarray(keep, dtype=HALVES_DTYPE)
    if not is_sorted_halves(keep):
        keep = sort_halves(keep)
    written = np.zeros(len(keep), dtype=bool)
    captions = captions or {}
    counts: Counter = Counter()
    skipped_errors: Counter = Counter()

    with TarShardWriter(output_dir, samples_per_shard=samples_per_shard) as writer:
        for source in sources:
            for batch in batched(read_shard(source, read_options), BATCH_SIZE):
                counts["read"] += len(batch)
                good = []
                for sample in batch:
                    if sample.ok:
                        good.append(sample)
                    else:
                        skipped_errors[sample.error] += 1
                if not good:
                    continue
                found, position = locate_sorted(keep, uids_to_halves([s.uid for s in good]))
                counts["not_selected"] += int((~found).sum())
                for sample, hit, pos in zip(good, found, position):
                    if not hit:
                        continue
                    if written[pos]:
                        counts["duplicates"] += 1
                        continue
                    written[pos] = True
                    replacement = captions.get(sample.uid)
                    counts["captions_replaced"] += replacement is not None
                    writer.write(sample.uid, output_files(sample, replacement))
                    counts["kept"] += 1
        shards = writer.close()
    counts["kept_not_found"] = int(len(keep) - written.sum())
    return _finish(output_dir, counts, skipped_errors, shards, overwrite, [])


@contextmanager
def _interrupt_says_what_was_written(writer: TarShardWriter, expected: int | None) -> Iterator[None]:
    """Ctrl-C: :class:`Interrupted` counting the pairs in complete output shards (a re-run needs --overwrite)."""
    try:
        yield
    except KeyboardInterrupt:
        written = len(writer.shards) * writer.samples_per_shard  # every complete shard is full
        then = (
            f"{len(writer.shards)} complete shards are in {writer.output_dir}: "
            "re-run the same command with --overwrite to write them all again"
        )
        raise Interrupted(written, max(expected or 0, written), "kept pairs", then) from None


def read_caption_replacements(path: str | os.PathLike, column: str = "caption") -> dict[str, str]:
    """uid -> new caption from a parquet file with a ``uid`` column and a text ``column`` (null or empty:
    the pair keeps its caption). Anything else is refused with one line (a ValueError) naming the file,
    the column and what it holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions file {path} does not exist")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"--captions {path} is not a parquet file ({' '.join(str(exc).split())[:200]})") from None
    for name, what in (("uid", "the pairs' uid"), (column, "the new caption")):
        if name not in schema.names:
            raise ValueError(
                f"--captions {path} has no column {name!r} ({what}); its columns: {', '.join(schema.names)}"
                + ("; name the caption column with --caption-column" if name == column else "")
            )
        dtype = schema.field(name).type
        if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)):
            raise ValueError(f"--captions {path}: column {name!r} holds {dtype}, not text ({what})")
    table = pq.read_table(path, columns=["uid", column])
    return {u: c for u, c in zip(table["uid"].to_pylist(), table[column].to_pylist()) if u and c}


def check_caption_replacements(captions: Mapping[str, Any]) -> None:
    """uid -> caption, both text: anything else is refused (a ValueError naming the first bad entry)."""
    for uid, caption in captions.items():
        if not isinstance(uid, str) or not isinstance(caption, str):
            raise ValueError(
                f"captions map uid -> caption text; got {type(uid).__name__} -> {type(caption).__name__} "
                f"({uid!r}: {caption!r})"
            )


def output_location(output_dir: str | os.PathLike) -> str:
    """A local output folder as an absolute path; an fsspec URL (``s3://b/out``) as that URL."""
    if remote_location(output_dir) is not None:
        return os.fspath(output_dir).rstrip("/")
    return os.path.abspath(local_location(output_dir))


def prepare_output(output_dir: str, sources: Sequence[ShardSource], overwrite: bool) -> None:
    """Refuse an output folder that holds (or is inside) inputs, or that is not empty."""
    remote = remote_location(output_dir)
    real_out = os.path.realpath(output_dir) if remote is None else output_dir
    for source in sources:
        if source.is_pipe or (is_url(source.url) != (remote is not None)):
            continue
        real_src = os.path.realpath(source.url) if remote is None else source.url.rstrip("/")
        holder = real_src if source.format == "folder" else real_src.rsplit("/", 1)[0]
        if real_out == holder or _inside(real_out, real_src) or _inside(real_src, real_out):
            raise ReshardError(
                f"output folder {output_dir} holds or is inside input {source.url}: writing there "
                "could destroy the inputs; choose a folder of its own"
            )
    listing = _listing(output_dir)
    if listing is not None:
        entries = [name for name in listing if not name.startswith(".")]
        if entries and not overwrite:
            raise ReshardError(
                f"output folder {output_dir} is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]}); "
                "old shards would be mixed with new ones. Choose an empty folder, or --overwrite to replace its contents"
            )
        if overwrite and any(listing[e] for e in entries):
            raise ReshardError(f"output folder {output_dir} holds subfolders; --overwrite only replaces files")


def _listing(output_dir: str) -> dict[str, bool] | None:
    """name -> is a folder, of what the output folder holds; None when there is no such folder."""
    remote = remote_location(output_dir)
    if remote is None:
        if not os.path.isdir(output_dir):
            return None
        return {e: os.path.isdir(os.path.join(output_dir, e)) for e in os.listdir(output_dir)}
    fs, path = remote
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return None
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("type") == "directory" for e in entries}


def output_files(sample: Sample, replacement: str | None) -> dict[str, bytes | str]:
    meta = dict(sample.meta)
    meta["uid"] = sample.uid
    caption = sample.caption
    if replacement is not None:
        meta["original_caption"] = caption
        if "caption" in meta:
            meta["caption"] = replacement
        caption = replacement
    ext = (sample.image_format or "").lower()
    if ext not in IMAGE_EXTS:
        ext = sniff_image_format(sample.image_bytes) or "img"
    return {
        ext: sample.image_bytes,
        "txt": caption,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
    }


def _finish(
    output_dir: str, counts: Counter, skipped_errors: Counter, shards: list, overwrite: bool, missing: list[str]
) -> dict[str, Any]:
    written = {str(p).rsplit("/", 1)[-1] for p in shards}
    removed = []
    if overwrite:
        remote = remote_location(output_dir)
        for name, is_dir in sorted((_listing(output_dir) or {}).items()):
            if name not in written and not name.startswith(".") and not is_dir:
                if remote is None:
                    os.remove(os.path.join(output_dir, name))
                else:
                    remote[0].rm_file(f"{remote[1]}/{name}")
                removed.append(name)
    stats = {
        "read": counts["read"],
        "kept": counts["kept"],
        "not_selected": counts["not_selected"],
        "duplicates": counts["duplicates"],
        "captions_replaced": counts["captions_replaced"],
        "skipped_errors": dict(skipped_errors),
        "kept_uids_not_found": counts["kept_not_found"],
        "not_found": missing[:20],
        "written_shards": len(shards),
        "removed_old_files": removed,
        "shards": [str(path) for path in shards],
    }
    return stats


def _inside(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip("/") + "/")
