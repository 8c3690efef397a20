"""The quickstart job on the bundled sample data, offline: random stand-ins must be announced."""

from __future__ import annotations

import json

import numpy as np
from tests.builders import scores_dataset
import pyarrow.dataset as ds
import pytest

from mlmfilter.demo import run_demo


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
