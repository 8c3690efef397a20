"""Progress in pairs: totals counted cheaply from real shards, movement per chunk inside a shard
(inline and from worker processes), plain periodic lines with an ETA when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlmfilter import api
from mlmfilter.io.readers.layout import estimate_rows
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs import progress as progress_module
from mlmfilter.runs.progress import RunProgress
from tests.support.builders import write_shard


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path, n):
    jpg = _jpeg()
    return write_shard(
        path, [{"key": f"{i:09d}", "jpg": jpg, "txt": "a blue picture of the sky", "json": {}} for i in range(n)]
    )


def test_pair_counts_come_from_footers_headers_and_img2dataset_stats(tmp_path):
    _tar(tmp_path / "a" / "00000.tar", 37)
    _tar(tmp_path / "b" / "00000.tar", 5)
    (tmp_path / "b" / "00000_stats.json").write_text(json.dumps({"count": 9, "successes": 5}))
    pq.write_table(pa.table({"jpg": [_jpeg()] * 11, "caption": ["c"] * 11}), tmp_path / "p.parquet", row_group_size=4)
    (tmp_path / "f").mkdir()
    counts = {
        s.url.replace(str(tmp_path), ""): estimate_rows(s)
        for s in expand_inputs(
            [f"{tmp_path}/a/00000.tar", f"{tmp_path}/b/00000.tar", f"{tmp_path}/p.parquet", f"{tmp_path}/f"]
        )
    }
    assert counts == {"/a/00000.tar": 37, "/b/00000.tar": 5, "/p.parquet": 11, "/f": None}


def test_plain_lines_show_pairs_of_the_estimated_total_and_an_eta(tmp_path, caplog):
    shards = [_tar(tmp_path / f"{i:05d}.tar", 100) for i in range(2)]
    sources = expand_inputs([str(p) for p in shards])
    with caplog.at_level(logging.INFO, logger="mlmfilter.progress"):
        with RunProgress("score", 2, interval=0.0, sources=sources, tty=False) as progress:
            assert progress.estimated.wait(30)  # counted beside the run
            progress.rows_done(50, 2)  # half of the first shard: the line moves before any shard ends
            progress.rows_done(50, 0)
            progress.shard_done(True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("score: 50/200 pairs, 0/2 shards (0 failed)") and "2 errors" in lines[0]
    assert re.search(r", eta \d+ s$", lines[0])
    assert lines[1].startswith("score: 100/200 pairs, 0/2 shards")
    assert lines[-1].startswith("score: 100/200 pairs, 1/2 shards") and "eta" not in lines[-1]  # the final line


def test_without_counts_the_total_follows_the_finished_shards():
    progress = RunProgress("score", 4, tty=False, sources=["x"] * 4, estimate=lambda s: None)
    assert progress.estimated.wait(30)
    assert progress.expected_rows is None and progress.eta is None
    progress.rows_done(30, 0)
    progress.shard_done(True)
    assert progress.expected_rows == 120 and progress._expected_text() == "~120"
    counted = RunProgress("score", 3, tty=False, sources=["a", "b", "c"], estimate={"a": 10, "b": 30, "c": None}.get)
    assert counted.estimated.wait(30)
    assert counted.expected_rows == 60 and counted._expected_text() == "~60"  # c is taken as the mean


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_reports_every_chunk_inline_and_from_worker_processes(tmp_path, monkeypatch, workers):
    shards = [_tar(tmp_path / "in" / f"{i:05d}.tar", 96) for i in range(2)]
    events: list[tuple] = []
    seen_totals: list = []
    original_rows, original_shard = RunProgress.rows_done, RunProgress.shard_done

    def rows_done(self, rows, errors):
        events.append(("rows", rows))
        seen_totals.append(self.expected_rows)
        original_rows(self, rows, errors)

    def shard_done(self, ok):
        events.append(("shard", ok))
        original_shard(self, ok)

    monkeypatch.setattr(progress_module.RunProgress, "rows_done", rows_done)
    monkeypatch.setattr(progress_module.RunProgress, "shard_done", shard_done)
    summary = api.score(
        [str(p) for p in shards],
        tmp_path / "run",
        ["rules"],
        workers=workers,
        decode_workers=0,
        chunk_size=16,
        show_progress=True,
    )
    assert summary.ok and summary.stats.rows == 192
    rows = [n for kind, n in events if kind == "rows"]
    assert rows == [16] * 12  # 96 pairs per shard in chunks of 16: the bar moves six times per shard
    assert events.index(("shard", True)) >= 6  # a whole shard's chunks arrive before it is done
    assert seen_totals[-1] == 192  # both tars counted from their headers (beside the run)
