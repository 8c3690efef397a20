"""The quickstart job on the bundled sample data, offline: random stand-ins must be announced."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlmfilter.demo.run import run_demo
from tests.support.builders import scores_dataset


@pytest.mark.slow
def test_demo_scores_selects_and_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_demo(tmp_path / "demo", with_mlm=True)
    run_dir = result["summary"].run_dir
    rows = {r["key"]: r for r in scores_dataset(run_dir).to_table().to_pylist()}
    labels = {}
    for shard in (tmp_path / "demo" / "shards").glob("*.tar"):
        import tarfile

        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    labels[m.name.split(".")[0]] = meta["demo_label"]
    assert len(rows) == len(labels) == 24
    errors = {labels[k]: r["error"] for k, r in rows.items() if r["error"]}
    assert errors == {"broken_image": "truncated_image", "empty": "empty_caption"}
    assert all(rows[k]["rules_ok"] is False for k, label in labels.items() if label in ("lazy", "non_english"))
    assert all(rows[k]["rules_ok"] for k, label in labels.items() if label == "good")
    assert all(r["itm"] is not None for r in rows.values() if not r["error"])

    provenance = json.loads((run_dir / "score" / "provenance.json").read_text())
    assert any("random" in w.lower() for w in provenance["warnings"])  # loud, in the provenance too
    subset = np.load(tmp_path / "demo" / "selection" / "uids.npy")
    assert len(subset) == result["selection"].kept == round(0.25 * 24)


def test_table_fits_80_columns_with_a_legend_and_next_steps(tmp_path, monkeypatch):
    """Real demo shards scored with the rules, the model columns filled with their widest values:
    at 80 columns (COLUMNS, as a terminal sets it) only captions may be cut, never a code or a header."""
    import io

    from rich.console import Console

    from mlmfilter import api
    from mlmfilter.demo.data import make_sample_shards
    from mlmfilter.demo.run import _results_table, _table_rows, legend, next_steps

    shards = make_sample_shards(tmp_path / "shards")
    run = api.score([str(tmp_path / "shards" / "*.tar")], tmp_path / "run", ["rules"]).run_dir
    api.select(run, tmp_path / "sel", expression="rules_ok")
    rows = _table_rows(run, tmp_path / "sel", shards)
    for i, row in enumerate(rows):
        if not row["error"]:
            row["clip_score"], row["itm"] = (2.5, 100.0) if i % 2 else (0.0, 7.25)
    monkeypatch.setenv("COLUMNS", "80")
    for by in ("itm", "clip_score"):
        console = Console(file=io.StringIO(), record=True)
        assert console.width == 80
        console.print(_results_table(rows, by, console.width))
        lines = console.export_text().splitlines()
        assert max(len(line) for line in lines) <= 80
        header = lines[1].split()
        assert header == ["label", "caption", "rules", "clip"] + (["itm"] if by == "itm" else []) + ["error", "kept"]
        body = [line for line in lines[3:] if line.strip()]
        assert len(body) == len(rows) == 24
        caption_end = lines[1].index("rules")  # where the caption column ends
        for line, row in zip(body, rows):
            rest = line[caption_end:]
            assert "…" not in rest, line  # nothing right of the caption is cut
            assert (row["error"] or "") in rest and ("yes" in rest) == row["kept"]
            assert row["label"] == line.split()[0]
        assert any("100.0" in line for line in body) == (by == "itm") and any("2.50" in line for line in body)
        assert any("…" in line for line in body)  # the long captions are the ones shortened
        text = legend(by, with_mlm=by == "itm")
        assert all(len(line) <= 80 for line in text.splitlines())
        assert {line.split()[0] for line in text.splitlines() if not line.startswith(" ")} == set(header) - {"caption"}
    steps = next_steps(tmp_path, run, None)
    assert f"mlmfilter reshard {tmp_path / 'selection'}" in steps and f"{run}/score/tables/" in steps
    assert "mlmfilter select RUN1 RUN2" in steps and "uids.npy" in steps


@pytest.mark.slow
def test_the_demo_runs_again_in_its_folder_resuming_or_rescoring(tmp_path, monkeypatch):
    """`make demo` twice: the same shards are left as they are, so the run resumes; a demo with other
    scorers in the same folder scores its run again instead of refusing with a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = run_demo(tmp_path / "demo", with_mlm=False)
    shards = sorted((tmp_path / "demo" / "shards").glob("*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = run_demo(tmp_path / "demo", with_mlm=False)
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    assert again["summary"].shards_skipped and not again["summary"].shards_completed  # resumed: nothing redone
    assert again["selection"].kept == first["selection"].kept
    other = run_demo(tmp_path / "demo", with_mlm=True)
    assert len(other["summary"].shards_completed) == len(shards)
    rows = scores_dataset(other["summary"].run_dir).to_table().to_pylist()
    assert all(r["itm"] is not None for r in rows if not r["error"])
