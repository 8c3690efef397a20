"""`--model <released hub id>`: tiny checkpoints in the ORIGINAL layouts, placed in a Hugging Face cache
laid out as huggingface_hub lays it out, scored offline (HF_HUB_OFFLINE=1) by hub id through the CLI:
converted once into the cache, reused the second time, converted again for a new revision, the same
scores as an explicit `mlmfilter convert`; safe when two processes ask at once; vllm refuses the
pooled layout before any work and is fed the converted folder for the llava-hf layouts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards, scores_dataset
from tests.support.hub_cache import (
    CLIP_ID,
    SIGLIP_ID,
    aitqe_checkpoint,
    clip_tower,
    llava15_checkpoint,
    place_in_hub_cache,
    siglip_tower,
    unified_qwen_checkpoint,
)

QWEN_ID = "weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o"
LLAVA13_ID = "weizhiwang/mlm-filter-llava-13b-gpt4v"
AITQE_ID = "HymanH/AITQE"
FIRST, SECOND = "1" * 40, "2" * 40  # hub commits
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, smollm2_cache_dir):
    """Original-layout folders (two revisions of the Qwen judge, the 13B judge) and the towers."""
    from tests.support.mlm import tokenizer as smollm2

    root = tmp_path_factory.mktemp("originals")
    return {
        "qwen": unified_qwen_checkpoint(root / "qwen-r1", smollm2(smollm2_cache_dir), seed=11),
        "qwen-r2": unified_qwen_checkpoint(root / "qwen-r2", smollm2(smollm2_cache_dir), seed=21),
        "llava13": llava15_checkpoint(root / "llava13", smollm2(smollm2_cache_dir)),
        "aitqe": aitqe_checkpoint(root / "aitqe", smollm2(smollm2_cache_dir)),
        "siglip": siglip_tower(root / "siglip"),
        "clip": clip_tower(root / "clip"),
    }


@pytest.fixture()
def hub(tmp_path, monkeypatch, originals):
    """An offline hub cache holding the released judges and their towers; converted judges go to a fresh cache."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-hub"
    place_in_hub_cache(cache, QWEN_ID, originals["qwen"], FIRST)
    place_in_hub_cache(cache, LLAVA13_ID, originals["llava13"], FIRST)
    place_in_hub_cache(cache, AITQE_ID, originals["aitqe"], FIRST)
    place_in_hub_cache(cache, SIGLIP_ID, originals["siglip"], "5" * 40)
    place_in_hub_cache(cache, CLIP_ID, originals["clip"], "6" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLMFILTER_CACHE", str(tmp_path / "mlmfilter-cache"))
    return cache


@pytest.fixture()
def conversions(monkeypatch):
    """Counts the conversions the cache runs (the real converter runs)."""
    import mlmfilter.convert.cache as cache

    calls: list[str] = []
    real = cache.converter

    def counting(layout):
        convert = real(layout)

        def run(*args, **kwargs):
            calls.append(layout)
            return convert(*args, **kwargs)

        return run

    monkeypatch.setattr(cache, "converter", counting)
    return calls


@pytest.fixture()
def shards(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=3)
    return tmp_path / "in" / "*.tar"


def score_args(shards, run):
    # tiny random judges put little mass on numbers: the floor is off, the scores are compared
    return [
        "score",
        shards,
        "-o",
        run,
        "--scorer",
        "mlm",
        "--metrics",
        "itm,odf",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--option",
        "mlm.min_mass=0",
    ]


def scores(run) -> dict[str, np.ndarray]:
    table = scores_dataset(run).to_table().sort_by("key")
    assert all(e is None for e in table["error"].to_pylist())
    return {c: table[c].to_numpy() for c in ("itm", "odf", "itm_std", "odf_mass")}


def entries(tmp_path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "mlmfilter-cache").rglob("mlmfilter_conversion.json"))


def test_score_by_hub_id_converts_once_reuses_then_converts_a_new_revision(
    tmp_path, hub, conversions, shards, originals
):
    # the default model of the mlm scorer IS the released Qwen2.5 judge: no --model needed
    first = cli(*score_args(shards, tmp_path / "run1"))
    assert first.exit_code == 0, first.output
    assert conversions == ["llava-unified"]
    [entry] = entries(tmp_path)
    assert entry.relative_to(tmp_path / "mlmfilter-cache").parts[:3] == (
        "converted",
        "models--weizhiwang--mlm-filter-qwen2.5-1.5b-gpt4o",
        FIRST,
    )
    marker = (entry / "mlmfilter_conversion.json").stat()

    provenance = json.loads((tmp_path / "run1" / "score" / "provenance.json").read_text())
    model = provenance["scorers"]["mlm"]["model"]
    assert model["model"] == QWEN_ID and "local_path" not in model
    assert model["converted"]["repo"] == QWEN_ID and model["converted"]["revision"] == FIRST
    assert model["converted"]["converter_version"] == "1" and model["converted"]["layout"] == "llava-unified"
    assert model["converted"]["vision_tower"] == {"repo": SIGLIP_ID, "revision": "5" * 40}
    assert provenance["scorers"]["mlm"]["checkpoint"]["released_judge"] == "mlm-filter-qwen2.5-1.5b"
    stage = yaml.safe_load((tmp_path / "run1" / "score" / "stage.yaml").read_text())
    identity = json.dumps(stage)
    assert FIRST in identity and QWEN_ID in identity and str(entry) not in identity  # no machine path

    # second run, by explicit id: the cache as it was (no download, no conversion), the same scores
    second = cli(*score_args(shards, tmp_path / "run2"), "--model", QWEN_ID)
    assert second.exit_code == 0, second.output
    assert conversions == ["llava-unified"]
    assert (entry / "mlmfilter_conversion.json").stat().st_mtime_ns == marker.st_mtime_ns
    for column, values in scores(tmp_path / "run1").items():
        np.testing.assert_array_equal(values, scores(tmp_path / "run2")[column])

    # the same command resumes run1: the identity (repo, revision, converter) is unchanged
    again = cli(*score_args(shards, tmp_path / "run1"))
    assert again.exit_code == 0, again.output
    assert "already done" in again.output

    # the same scores as an explicit `mlmfilter convert` of the original folder
    tower = hub / ("models--" + SIGLIP_ID.replace("/", "--")) / "snapshots" / ("5" * 40)
    converted = cli("convert", originals["qwen"], tmp_path / "explicit", "--vision-tower", tower)
    assert converted.exit_code == 0, converted.output
    explicit = cli(*score_args(shards, tmp_path / "run3"), "--model", tmp_path / "explicit")
    assert explicit.exit_code == 0, explicit.output
    for column, values in scores(tmp_path / "run1").items():
        np.testing.assert_allclose(values, scores(tmp_path / "run3")[column], atol=1e-6, rtol=0)

    # a new revision on the hub: converted again, its own identity (the old run refuses it)
    place_in_hub_cache(hub, QWEN_ID, originals["qwen-r2"], SECOND)
    changed = cli(*score_args(shards, tmp_path / "run1"))
    assert changed.exit_code != 0
    assert conversions == ["llava-unified", "llava-unified"]
    assert [e.parent.name for e in entries(tmp_path)] == [FIRST, SECOND]
    fresh = cli(*score_args(shards, tmp_path / "run4"))
    assert fresh.exit_code == 0, fresh.output
    assert conversions == ["llava-unified", "llava-unified"]
    assert not np.allclose(scores(tmp_path / "run4")["itm"], scores(tmp_path / "run1")["itm"])


def test_two_processes_asking_at_once_convert_once(tmp_path, hub, conversions):
    from mlmfilter.convert.cache import converted_judge

    results, errors = [], []

    def ask():
        try:
            results.append(converted_judge(QWEN_ID))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert conversions == ["llava-unified"]
    assert len({r.path for r in results}) == 1 and sum(r.converted_now for r in results) == 1
    assert not [p for p in results[0].path.parent.iterdir() if ".tmp-" in p.name]


def test_a_half_written_conversion_is_never_used(tmp_path, hub, conversions):
    from mlmfilter.convert.cache import converted_judge

    done = converted_judge(QWEN_ID)
    (done.path / "mlmfilter_conversion.json").unlink()  # as if killed before the marker: not an entry
    (done.path.parent / f".{done.path.name}.tmp-1-dead").mkdir()  # a killed conversion's leftovers
    again = converted_judge(QWEN_ID)
    assert again.converted_now and conversions == ["llava-unified", "llava-unified"]
    assert (again.path / "mlmfilter_conversion.json").is_file()
    assert [p.name for p in again.path.parent.iterdir() if not p.name.endswith(".lock")] == [again.path.name]


def test_not_an_original_layout_is_left_to_the_loaders(tmp_path, hub, conversions, originals):
    from mlmfilter.convert.cache import converted_judge

    assert converted_judge("nobody/not-in-the-cache") is None
    assert converted_judge(str(originals["siglip"])) is None  # a transformers folder
    assert converted_judge(SIGLIP_ID) is None
    assert conversions == []


def test_a_local_original_folder_is_converted_once_by_its_content(tmp_path, hub, conversions, originals):
    from mlmfilter.convert.cache import converted_judge

    first = converted_judge(str(originals["llava13"]))
    assert first.layout == "llava-1.5" and first.repo is None and first.revision.startswith("sha256:")
    assert first.vision_tower["repo"] == CLIP_ID  # the tower config.json names, from the hub cache
    assert converted_judge(str(originals["llava13"])).path == first.path
    assert conversions == ["llava-1.5"]


def test_offline_without_the_tower_fails_with_one_clear_line(tmp_path, hub, shards):
    import shutil

    shutil.rmtree(hub / ("models--" + SIGLIP_ID.replace("/", "--")))
    result = cli(*score_args(shards, tmp_path / "run"), "--model", QWEN_ID)
    assert result.exit_code == 2
    assert SIGLIP_ID in result.output and "HF_HUB_OFFLINE" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and entries(tmp_path) == []


def test_aitqe_by_its_hub_id_takes_the_registrys_tower_config(tmp_path, hub, conversions, flickr_pairs):
    """AITQE's config names the SigLIP by a path of the author's machine: the registry's hub id is used for
    its config and preprocessing (the weights are the checkpoint's own); the scorer's default model works."""
    from PIL import Image

    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers.aitqe import AITQEOptions, AITQEScorer

    scorer = AITQEScorer(AITQEOptions(device="cpu", dtype="fp32", max_new_tokens=6))
    assert conversions == ["aitqe"] and scorer.converted.repo == AITQE_ID
    assert scorer.converted.vision_tower == {"repo": SIGLIP_ID, "revision": "5" * 40}
    image, caption = flickr_pairs[0]
    sample = Sample(uid="u", shard="s", key="k", caption=caption, image=Image.open(image).convert("RGB"))
    [row] = scorer.score([sample])
    assert isinstance(row["aitqe_raw"], str)  # generated (random weights: no score to parse)
    model = scorer.provenance()["model"]
    assert model["model"] == AITQE_ID and model["converted"]["layout"] == "aitqe"
    assert scorer.identity()["options"]["model"] == AITQE_ID
    scorer.close()


# -- vllm -----------------------------------------------------------------------------------------------


def test_vllm_refuses_the_pooled_layout_before_any_work(tmp_path, hub, conversions, shards):
    result = cli(*score_args(shards, tmp_path / "run"), "--model", QWEN_ID, "--backend", "vllm")
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "vllm cannot run" in output and "aapool_mlp" in output and "--backend transformers" in output
    assert conversions == [] and entries(tmp_path) == []  # nothing converted
    assert not (tmp_path / "run").exists()  # no run started


def test_vllm_refuses_a_converted_pooled_folder_too(tmp_path, hub):
    from mlmfilter.convert.cache import converted_judge
    from mlmfilter.scorers.mlm import MLMOptions

    folder = converted_judge(QWEN_ID).path
    with pytest.raises(ValueError, match="aapool_mlp"):
        MLMOptions(model=str(folder), backend="vllm")


def test_vllm_is_fed_the_converted_llava_folder(tmp_path, hub, monkeypatch):
    """The 13B layout by hub id with --backend vllm: the engine is built on the converted llava-hf folder."""
    import mlmfilter.backends.vllm as vllm_backend
    from mlmfilter.scorers.mlm import MLMOptions, MLMScorer

    built = {}

    class RecordingEngine:  # stands in for vllm.LLM (no vLLM on this machine): records what it is given
        def __init__(self, model, options, token_ids):
            built.update(model=model, token_ids=list(token_ids))

        def close(self):
            pass

    monkeypatch.setattr(vllm_backend, "VllmEngine", RecordingEngine)
    scorer = MLMScorer(MLMOptions(model=LLAVA13_ID, backend="vllm", metrics="itm"))
    assert scorer.converted is not None and scorer.converted.layout == "llava-1.5"
    assert scorer.released is not None and scorer.released.judge.key == "mlm-filter-llava-13b"
    scorer.setup()
    assert built["model"] == str(scorer.converted.path) and built["token_ids"]
    config = json.loads((scorer.converted.path / "config.json").read_text())
    assert config["model_type"] == "llava"  # llava-hf: the architecture vLLM implements
    assert scorer.backend.conversation == "vicuna_v1"  # as the 13B judge was trained
    assert scorer.provenance()["model"]["converted"]["repo"] == LLAVA13_ID
    scorer.close()


# -- plan -----------------------------------------------------------------------------------------------


def test_plan_of_a_released_judge_counts_the_same_tokens_before_and_after_conversion(tmp_path, hub, shards):
    """Before: the original checkpoint's tokenizer and the registry's image tokens (nothing converted, no
    weights fetched); after: the converted judge's processor on the real images. The same counts."""
    from mlmfilter.convert.cache import converted_judge

    def plan():
        result = cli("plan", shards, "--scorer", "mlm", "--model", QWEN_ID, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["scorers"][0]

    before = plan()
    assert entries(tmp_path) == []  # planning converts nothing
    assert "own tokenizer" in before["tokens_from"] and "4 image tokens" in before["tokens_from"]
    converted_judge(QWEN_ID)
    after = plan()
    assert after["tokens_from"].startswith("exact:") and "processor" in after["tokens_from"]
    assert after["llm_tokens_per_metric_pass"] == before["llm_tokens_per_metric_pass"] > 0
    assert after["llm_tokens"] == before["llm_tokens"] < before["llm_tokens_per_metric_pass"]


@pytest.mark.slow
def test_the_command_reads_the_hub_cache_named_by_the_environment(tmp_path, originals, shards):
    """A fresh process, configured only as a user would: HF_HUB_CACHE, HF_HUB_OFFLINE=1, MLMFILTER_CACHE."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    place_in_hub_cache(cache, QWEN_ID, originals["qwen"], FIRST)
    place_in_hub_cache(cache, SIGLIP_ID, originals["siglip"], "5" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MLMFILTER_CACHE": str(tmp_path / "mc")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "mlmfilter.cli.app", *map(str, score_args(shards, tmp_path / "run"))]
    done = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]
    assert "converted weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o" in " ".join(done.stderr.split())
    [entry] = sorted((tmp_path / "mc").rglob("mlmfilter_conversion.json"))
    assert entry.parent.parent.name == FIRST


def test_offline_a_converted_judge_works_after_its_snapshot_was_deleted(tmp_path, hub, conversions):
    import shutil

    from mlmfilter.convert.cache import converted_judge

    first = converted_judge(QWEN_ID)
    storage = hub / ("models--" + QWEN_ID.replace("/", "--"))
    shutil.rmtree(storage / "snapshots")  # `hf cache delete`-like: refs/main stays
    shutil.rmtree(storage / "blobs")
    again = converted_judge(QWEN_ID)
    assert again.path == first.path and not again.converted_now and again.revision == FIRST
    assert conversions == ["llava-unified"]
