"""Score files in the layout the released MLM-Filter scoring scripts write.

The scripts write, per input shard ``{id:08d}.tar`` and metric, ``{id:08d}_{metric}.parquet``: one
row per sample holding every field of the sample's ``.json`` plus ``{metric}_score``, the decoded
greedy answer as a STRING (e.g. ``"85"``; Open-Qwen2VL's ``apply_filter.py`` then parses its first
line with ``int()``). :func:`export_mlm_filter` writes that layout from a run's ``score`` stage:

* with the ``generate`` readout, ``{metric}_score`` is the raw answer (``<m>_raw``), as the script wrote it;
* with the ``expected`` readout it is the expected score rounded to an integer, as a string;
* an error row (no score) gets an empty string, which ``int()`` rejects like any unparsable answer.

The sample's json fields are read back from the run's own input shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from mlmfilter.judge.prompts import METRICS
from mlmfilter.judge.readout import parse_generated_score


def _score_text(row: dict[str, Any], short: str) -> str:
    raw = row.get(f"{short}_raw")
    if isinstance(raw, str):
        return raw
    value = row.get(short)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(round(float(value))))


def export_mlm_filter(run_dir: str | Path, out_dir: str | Path, stage: str = "score") -> list[Path | str]:
    """Write ``{shard}_{metric}.parquet`` for every completed shard and every MLM metric the run scored."""
    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.readers.options import ReadOptions
    from mlmfilter.io.writers import atomic_write_parquet, join_location, remote_location
    from mlmfilter.runs.read import RunReader

    run = RunReader(run_dir)
    names = set(run.schema(stage).names)
    metrics = [(long, short) for long, short in METRICS.items() if short in names]
    if not metrics:
        raise ValueError(
            f"{run_dir} has no MLM-Filter score columns ({', '.join(METRICS.values())}) in stage {stage!r}"
        )
    out = join_location(out_dir)  # a local folder, or an fsspec URL as given
    if remote_location(out_dir) is None:
        Path(out).mkdir(parents=True, exist_ok=True)
    options = ReadOptions(**run.read_options())
    written: list[Path | str] = []
    for shard_id, source in run.sources().items():
        table = run.table(shard_id, stage)
        if table is None:
            continue
        metas = {sample.key: sample.meta for sample in read_shard(source, options)}
        rows = table.to_pylist()
        for long, short in metrics:
            records = []
            for row in rows:
                record = dict(metas.get(row["key"]) or {})
                record.setdefault("uid", row["uid"])
                record[f"{long}_score"] = _score_text(row, short)
                records.append(record)
            name = f"{shard_id}_{long}.parquet"
            written.append(atomic_write_parquet(pa.Table.from_pylist(records), join_location(out_dir, name)))
    return written


def import_mlm_filter(
    dumps: str | Path, run_dir: str | Path, shards: list[str] | None = None, stage: str = "score"
) -> dict[str, int]:
    """Turn published ``{shard}_{metric}.parquet`` score files into a run ``select`` reads.

    Rows of one shard are joined on ``uid`` across metrics (a sample missing from one metric's
    file gets no score for it); two rows of one file sharing a uid are two pairs kept apart by
    their keys (joined on uid and key), and two rows of one file that are the same pair (same uid
    and key) are refused, naming the file and rows. A row with neither a key nor a valid uid is a
    ``bad_metadata`` error row naming its file and row. A ``{metric}_score`` whose first line is
    not an integer 0..100 is an ``unparseable_score`` error row (naming file and row) that keeps
    the text in ``<m>_raw``. ``shards`` (input
    specs) are the tar shards the dumps describe: given, they are registered under the same ids,
    so ``reshard`` can write the kept pairs.
    """
    import re
    from collections import defaultdict

    import fsspec

    from mlmfilter.core import errors
    from mlmfilter.core.locations import is_local_filesystem, location_of
    from mlmfilter.io.sources import expand_inputs, shard_stem
    from mlmfilter.runs.runner import write_tables

    fs, root = fsspec.core.url_to_fs(str(Path(dumps).expanduser()) if "://" not in str(dumps) else str(dumps))
    where = str(Path(root).resolve()) if is_local_filesystem(fs) else location_of(fs, root)  # as runs recorded it
    long_to_short = dict(METRICS)
    short_to_long = {short: long for long, short in METRICS.items()}
    pattern = re.compile(r"^(?P<shard>.+)_(?P<metric>" + "|".join(map(re.escape, long_to_short)) + r")\.parquet$")
    files: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(fs.glob(root.rstrip("/") + "/*.parquet")):
        match = pattern.match(path.rsplit("/", 1)[-1])
        if match:
            files[match["shard"]][long_to_short[match["metric"]]] = location_of(fs, path)
    if not files:
        raise ValueError(
            f"{where} holds no MLM-Filter score files ({{shard}}_{{metric}}.parquet, metric one of {', '.join(METRICS)})"
        )
    metrics = sorted({short for per_shard in files.values() for short in per_shard}, key=list(METRICS.values()).index)
    sources = {shard_stem(s.url): s for s in expand_inputs(shards)} if shards else {}
    tables: dict[str, pa.Table] = {}
    counts = {"shards": 0, "rows": 0, "unparseable": 0, "unidentified": 0}
    for shard_id, per_metric in sorted(files.items()):
        entries = {
            short: _dump_entries(path, shard_id, f"{short_to_long[short]}_score") for short, path in per_metric.items()
        }
        split = _uids_kept_apart_by_key(entries, per_metric)
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for short, path in per_metric.items():
            long = short_to_long[short]
            for number, uid, key, text in entries[short]:
                where = f"{path.rsplit('/', 1)[-1]} row {number}"
                if uid is None:  # neither a key nor a valid uid: nothing to join it on, its own error row
                    rows[(where,)] = {
                        "uid": None,
                        "shard": shard_id,
                        "key": None,
                        "error": errors.BAD_METADATA,
                        "error_detail": f"{where}: neither a key nor a valid uid",
                    }
                    counts["unidentified"] += 1
                    continue
                row = rows.setdefault(
                    (uid, key) if uid in split else (uid,),
                    {"uid": uid, "shard": shard_id, "key": key, "error": None, "error_detail": None},
                )
                row[f"{short}_raw"] = text
                value = parse_generated_score(text)  # the released scripts' own parse: int() of the first line
                row[short] = float(value) if value is not None else None
                if value is None and row["error"] is None:
                    row["error"], row["error_detail"] = (
                        errors.UNPARSEABLE_SCORE,
                        f"{where}: {long}_score {text[:200]!r}",
                    )
                    counts["unparseable"] += 1
        fields = [pa.field(c, pa.string()) for c in ("uid", "shard", "key")]
        fields += [f for m in metrics for f in (pa.field(m, pa.float32()), pa.field(f"{m}_raw", pa.string()))]
        fields += [pa.field("error", pa.string()), pa.field("error_detail", pa.string())]
        tables[shard_id] = pa.Table.from_pylist(list(rows.values()), schema=pa.schema(fields))
        counts["shards"] += 1
        counts["rows"] += len(rows)
    missing = sorted(set(tables) - set(sources)) if sources else []
    if missing:
        raise ValueError(f"--shards has no tar for score files of shard(s) {', '.join(missing[:5])}")
    registered = [type(s)(id=sid, url=s.url, format=s.format) for sid, s in sources.items() if sid in tables]
    write_tables(
        run_dir,
        stage,
        tables,
        sources=registered,
        identity={"kind": "imported", "format": "mlm-filter", "dumps": where, "metrics": metrics},
        provenance={
            "imported_from": where,
            "format": "mlm-filter score files",
            "readout": "generate (the released scripts' greedy answer)",
        },
    )
    return counts


def _dump_entries(path: str, shard_id: str, column: str) -> list[tuple[int, str | None, str, str]]:
    """(row number from 1, uid or None, key, score text) of every row of one score file."""
    import fsspec
    import pyarrow.parquet as pq

    from mlmfilter.io.uid import derive_uid, normalize_uid

    try:
        with fsspec.open(path, "rb") as fh:  # a local path or an fsspec URL
            table = pq.read_table(fh)
    except Exception as exc:  # not parquet, truncated, unreadable
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if column not in table.column_names:
        raise ValueError(f"{path}: no {column} column (columns: {', '.join(table.column_names)})")
    out = []
    for number, record in enumerate(table.to_pylist(), 1):
        raw_key = record.get("key")
        raw_key = raw_key if raw_key not in (None, "") else record.get("__key__")
        key = "" if raw_key in (None, "") else str(raw_key)
        uid = normalize_uid(record.get("uid")) or (derive_uid(f"{shard_id}.tar", key) if key else None)
        text = record.get(column)
        out.append((number, uid, key, "" if text is None else str(text)))
    return out


def _uids_kept_apart_by_key(entries: dict[str, list], paths: dict[str, str]) -> set[str]:
    """Uids that two rows of one file share: kept apart by key. Two rows of one file that are the same
    pair (same uid and key) would give one pair the other's score: refused, naming file and rows."""
    split: set[str] = set()
    for short, rows in entries.items():
        seen: dict[tuple[str, str], int] = {}
        uids: set[str] = set()
        for number, uid, key, _ in rows:
            if uid is None:
                continue
            if (uid, key) in seen:
                raise ValueError(
                    f"{paths[short]}: rows {seen[(uid, key)]} and {number} are the same pair "
                    f"(uid {uid}{f', key {key!r}' if key else ''}); one of them would take the other's score. "
                    "Remove the duplicate row, or give the rows their own keys"
                )
            seen[(uid, key)] = number
            if uid in uids:
                split.add(uid)
            uids.add(uid)
    return split
