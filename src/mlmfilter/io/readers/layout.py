"""What a shard holds (columns, member extensions, table fields), to tell the user which flag fixes a
shard none of whose pairs could be read.

Called once per shard after it is scored, only when every row failed for want of an image or a
caption, or the shard was unreadable: it peeks at the schema, the first tar members or the folder's
listing, never at the whole shard."""

from __future__ import annotations

import csv
import json
import tarfile
from typing import Mapping

import fsspec

from mlmfilter.core import errors
from mlmfilter.core.locations import is_url
from mlmfilter.io.readers.files import open_shard_file
from mlmfilter.io.readers.options import CAPTIONS_FILES, ReadOptions
from mlmfilter.io.readers.samples import split_member_name
from mlmfilter.io.sources import ShardSource

LAYOUT_ERRORS = errors.LAYOUT_ERRORS
_PEEK_MEMBERS = 64
#: hints named per run: a thousand shards of one layout need one line, not a thousand
MAX_HINTS = 5


def shard_hint(source: ShardSource, options: ReadOptions, rows: int, error_counts: Mapping[str, int]) -> str | None:
    """One line naming what the shard holds and the flag to pass, when every row failed because
    the image or caption was not found (or the shard could not be read); else None."""
    failed = {code for code, n in error_counts.items() if n}
    if rows <= 0 or sum(error_counts.values()) < rows or not failed or not failed <= LAYOUT_ERRORS:
        return None
    try:
        found, suggest = _inspect(source, options)
    except Exception as exc:  # the hint must never fail a run
        return f"input {source.url}: no pair could be read, and its layout cannot be inspected ({type(exc).__name__}: {exc})"
    where = {"parquet": "columns", "tar": "member extensions", "folder": "files/fields"}[source.format]
    listed = ", ".join(found[:30]) + (", ..." if len(found) > 30 else "")
    flag_of = {"image": "--image-column", "caption": "--caption-column"}
    if errors.UNREADABLE_SHARD in failed:
        if source.format != "parquet":
            return f"input {source.url} could not be read ({where} found: [{listed}])"
        if "not found" in suggest.get("problem", ""):  # a column named in the flags or the recipe
            return (
                f"input {source.url}: {suggest['problem']}; check --image-column, --caption-column, "
                "--uid-column, --url-column (or the recipe's read: block)"
            )
        lack = "image"  # the other layout reason a parquet is refused: no image column at all
    else:
        lack = "caption" if errors.MISSING_CAPTION in failed and errors.MISSING_IMAGE not in failed else "image"
    if source.format == "parquet" and lack == "image" and suggest.get("urls_only"):
        from mlmfilter.io.readers.parquet import urls_only_detail

        return f"input {source.url}: {urls_only_detail(suggest['urls_only'])}"
    both = (errors.MISSING_CAPTION in failed and errors.MISSING_IMAGE in failed) or bool(
        suggest.get("no_caption_either")
    )
    parts = []
    for what in ("image", "caption") if both else (lack,):
        guess, used = suggest.get(what), suggest.get(f"used_{what}")
        if used and guess in (None, used):  # the column is there, its values are not
            parts.append(f"column {used!r} holds no {what} in any row (columns: [{listed}]); pass {flag_of[what]} NAME")
            continue
        flag = f"pass {flag_of[what]} {guess}" if guess else f"pass {flag_of[what]} NAME"
        parts.append(f"no {what} {'column' if source.format == 'parquet' else 'found'} among [{listed}]; {flag}")
    return f"input {source.url}: " + "; ".join(parts)


def _inspect(source: ShardSource, options: ReadOptions) -> tuple[list[str], dict[str, str]]:
    """(what the shard holds, {"image"/"caption"/"urls_only": the likely name})."""
    if source.format == "parquet":
        return _parquet_layout(source, options)
    if source.format == "tar":
        return _tar_layout(source)
    return _folder_layout(source)


def _parquet_layout(source: ShardSource, options: ReadOptions) -> tuple[list[str], dict[str, str]]:
    import pyarrow.parquet as pq

    from mlmfilter.io.readers import parquet as reader

    with open_shard_file(source.url) as fh:
        schema = pq.ParquetFile(fh).schema_arrow
    suggest: dict[str, str] = {}
    binary = [f.name for f in schema if reader._is_image_bytes_type(f.type)]
    text = [f.name for f in schema if reader._is_text_type(f.type)]
    try:
        columns = reader._ParquetColumns(schema, options)
        if columns.urls_only and columns.url:
            suggest["urls_only"] = columns.url
        taken = {columns.image, columns.image_path, columns.url, columns.uid, columns.key}
        for what, used in (("image", columns.image or columns.image_path), ("caption", columns.caption)):
            if used:
                suggest[f"used_{what}"] = used
    except ValueError as exc:
        suggest["problem"] = str(exc)
        taken = set()
        if binary and "not found" not in str(exc):  # no image column: would the caption be found with one?
            try:
                trial = reader._ParquetColumns(schema, options.model_copy(update={"image_column": binary[0]}))
            except ValueError:
                trial = None
            if trial is not None and trial.caption is None:
                suggest["no_caption_either"] = "1"  # say both at once: one retry, not two
    if binary:  # another binary column than the one read, if there is one
        others = [n for n in binary if n != suggest.get("used_image")]
        suggest["image"] = (others or binary)[0]
    texts = [n for n in text if n not in taken and n != suggest.get("used_caption")]
    # a caption-like name first (TEXT_EN, caption_en, alt), then any other text column
    captionish = [n for n in texts if any(w in n.lower() for w in ("text", "caption", "alt", "prompt", "desc"))]
    if captionish or texts:
        suggest["caption"] = (captionish or texts)[0]
    return list(schema.names), suggest


def _tar_layout(source: ShardSource) -> tuple[list[str], dict[str, str]]:
    exts: list[str] = []
    with open_shard_file(source.url) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for i, member in enumerate(tar):
            if i >= _PEEK_MEMBERS:
                break
            parts = split_member_name(member.name) if member.isfile() else None
            if parts and parts[1] not in exts:
                exts.append(parts[1])
    return exts, _member_guesses(exts)


def _folder_layout(source: ShardSource) -> tuple[list[str], dict[str, str]]:
    fs, root = fsspec.core.url_to_fs(source.url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    table = next((n for n in CAPTIONS_FILES if n in names), None)
    if table is not None:  # the captions table's fields are what matters
        with fs.open(f"{root.rstrip('/')}/{table}", "rb") as fh:
            first_line = fh.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
        if table.endswith(".jsonl"):
            first = json.loads(first_line or "{}")
            fields = list(first) if isinstance(first, dict) else []
        else:  # csv / tsv: the header
            fields = next(csv.reader([first_line], delimiter="\t" if table.endswith(".tsv") else ","), [])
        captionish = [k for k in fields if any(w in k.lower() for w in ("text", "caption", "alt", "prompt", "desc"))]
        return [f"{table}: {', '.join(fields)}"], ({"caption": captionish[0]} if captionish else {})
    exts = sorted({parts[1] for n in names if (parts := split_member_name(n))})
    return exts, _member_guesses(exts)


def _member_guesses(exts: list[str]) -> dict[str, str]:
    from mlmfilter.io.readers.options import IMAGE_EXTS

    suggest = {}
    images = [e for e in exts if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if images:
        suggest["image"] = images[0]
    texts = [e for e in exts if e not in images and e not in ("json", "cls")]
    if texts:
        suggest["caption"] = texts[0]
    return suggest


# -- how many pairs a shard holds, cheaply (for progress bars) ----------------------------------------


def estimate_rows(source: ShardSource) -> int | None:
    """The number of pairs in ``source`` when it can be told without reading it: a parquet's footer,
    img2dataset's ``_stats.json`` beside a tar, or an uncompressed local tar's headers (seeking
    past the data). None for remote shards, compressed tars, folders and pipes."""
    import os

    from mlmfilter.io.sources import shard_stem

    url = source.url
    if source.is_pipe or is_url(url) or not os.path.isfile(url):
        return None
    try:
        if source.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(url).metadata.num_rows
        if source.format != "tar":
            return None
        stats = os.path.join(os.path.dirname(url), f"{shard_stem(url)}_stats.json")
        if os.path.isfile(stats):  # img2dataset: what was written to the tar
            with open(stats, encoding="utf-8") as fh:
                successes = json.load(fh).get("successes")
            if isinstance(successes, int):
                return successes
        if not url.lower().endswith(".tar"):
            return None
        keys = set()
        with tarfile.open(url, mode="r:") as tar:  # random access: member data is skipped, not read
            for member in tar:
                parts = split_member_name(member.name) if member.isfile() else None
                if parts:
                    keys.add(parts[0])
                tar.members = []
        return len(keys)
    except Exception:  # an estimate only: the reader reports what is wrong with the shard
        return None
