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


def _score_text(row: dict[str, Any], short: str) -> str:
    raw = row.get(f"{short}_raw")
    if isinstance(raw, str):
        return raw
    value = row.get(short)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(round(float(value))))


def export_mlm_filter(run_dir: str | Path, out_dir: str | Path, stage: str = "score") -> list[Path]:
    """Write ``{shard}_{metric}.parquet`` for every completed shard and every MLM metric the run scored."""
    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.readers.options import ReadOptions
    from mlmfilter.io.writers import atomic_write_parquet
    from mlmfilter.runs.read import RunReader

    run = RunReader(run_dir)
    names = set(run.schema(stage).names)
    metrics = [(long, short) for long, short in METRICS.items() if short in names]
    if not metrics:
        raise ValueError(f"{run_dir} has no MLM-Filter score columns ({', '.join(METRICS.values())}) in stage {stage!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    options = ReadOptions(**run.read_options())
    written: list[Path] = []
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
            written.append(atomic_write_parquet(pa.Table.from_pylist(records), out / f"{shard_id}_{long}.parquet"))
    return written
