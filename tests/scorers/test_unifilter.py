"""`--scorer unifilter`: tiny checkpoints in UniFilter's ORIGINAL layout (Qwen2.5 + SigLIP, Qwen3 + SigLIP-2,
random weights), scored through the public paths on real Flickr8k photos and checked against the
classifier's forward written by hand from the original code (tests/support/unifilter.py), in fp32,
in both request settings; scores do not depend on the batch; a hub id loads from the Hugging Face cache
offline."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.runs.read import RunReader
from mlmfilter.scorers import build_scorer
from tests.support.builders import write_shard
from tests.support.unifilter import LAYOUTS, build_unifilter, pilrgb, place_in_hub_cache, reference_score

TOL = 1e-4
PAIRS = 7


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint(request, tmp_path_factory, smollm2_cache_dir):
    from tests.support.mlm import tokenizer as smollm2

    root = tmp_path_factory.mktemp(f"unifilter-{request.param}")
    return build_unifilter(root, request.param, smollm2(smollm2_cache_dir))


@pytest.fixture(scope="module")
def pairs(flickr_pairs):
    """(jpeg bytes, caption): real photos and captions, one caption holding a literal <image>, one long
    enough that the released script cuts it (and its EOS) at 75 ids."""
    chosen = [(path.read_bytes(), caption) for path, caption in flickr_pairs[:PAIRS]]
    jpeg, caption = chosen[1]
    chosen[1] = (jpeg, "An <image> of " + caption)
    jpeg, caption = chosen[2]
    chosen[2] = (jpeg, " ".join([caption] * 12))
    return chosen


@pytest.fixture(scope="module")
def shard(tmp_path_factory, pairs):
    path = tmp_path_factory.mktemp("unifilter-shard") / "00000.tar"
    return write_shard(path, [{"key": f"{i:03d}", "jpg": jpeg, "txt": text} for i, (jpeg, text) in enumerate(pairs)])


def options(checkpoint, **extra) -> dict:
    return {
        "model": str(checkpoint["src"]),
        "vision_tower": str(checkpoint["tower_dir"]),
        "device": "cpu",
        "dtype": "fp32",
        **extra,
    }


def scores_of(run) -> list[float]:
    table = RunReader(run).dataset("score").to_table().sort_by("key")
    assert table["error"].null_count == len(table)
    return table["unifilter_score"].to_pylist()


@pytest.mark.parametrize("settings", ["released-script", "trained"])
def test_scores_match_the_original_forward(checkpoint, shard, pairs, settings, tmp_path):
    run = tmp_path / "run"
    opts = options(checkpoint, checkpoint_settings=settings, batch_size=4)
    api.score([str(shard)], run, [{"name": "unifilter", "options": opts}])
    ours = scores_of(run)
    released = settings == "released-script"
    reference = [reference_score(checkpoint, pilrgb(jpeg), text, released) for jpeg, text in pairs]
    assert max(reference) - min(reference) > 0.05  # the pairs are told apart: not a comparison of constants
    assert ours == pytest.approx(reference, abs=TOL, rel=0)
    # the long caption is read at its 75th id in the released setting, whole when trained
    if released:
        cut = reference_score(checkpoint, pilrgb(pairs[2][0]), pairs[2][1], released=False)
        assert abs(cut - ours[2]) > TOL

    provenance = RunReader(run).provenance("score")["scorers"]["unifilter"]
    layout = checkpoint["layout"]
    assert provenance["checkpoint_settings"] == settings
    assert provenance["request"] == {
        "settings": settings,
        "pad_to_square": not released,
        "max_ids": 75 if released else None,
    }
    assert provenance["model"]["num_labels"] == layout.num_labels
    assert provenance["vision_tower"]["resample"] == layout.tower_resample
    assert ("softmax" in provenance["score_definition"]) == (layout.num_labels > 1)


def test_scores_do_not_depend_on_the_batch(checkpoint, pairs):
    scorer = build_scorer("unifilter", options(checkpoint))
    by_batch = {}
    for batch_size in (1, 3, 8):
        scorer.batch_size = batch_size
        samples = [
            Sample(key=str(i), uid=str(i), shard="s", image_bytes=jpeg, caption=text)
            for i, (jpeg, text) in enumerate(pairs + pairs[:1])
        ]
        for sample in samples:
            decode_sample(sample, DecodeSpec(shorter_side=scorer.image_size))
        by_batch[batch_size] = [row["unifilter_score"] for row in scorer.score(samples)]
    assert by_batch[3] == pytest.approx(by_batch[1], abs=1e-5, rel=0)
    assert by_batch[8] == pytest.approx(by_batch[1], abs=1e-5, rel=0)
    scorer.close()


def test_an_empty_caption_is_an_error_row_and_the_rest_are_scored(checkpoint, pairs):
    scorer = build_scorer("unifilter", options(checkpoint))
    samples = [
        Sample(key=str(i), uid=str(i), shard="s", image_bytes=jpeg, caption=text)
        for i, (jpeg, text) in enumerate(pairs[:3])
    ]
    samples[1].caption = "  "
    for sample in samples:
        decode_sample(sample, DecodeSpec(shorter_side=scorer.image_size))
    rows = scorer.score(samples)
    assert rows[1]["unifilter_score"] is None and samples[1].error == errors.EMPTY_CAPTION
    reference = [reference_score(checkpoint, pilrgb(pairs[i][0]), pairs[i][1], True) for i in (0, 2)]
    assert [rows[0]["unifilter_score"], rows[2]["unifilter_score"]] == pytest.approx(reference, abs=TOL, rel=0)


def test_a_checkpoint_saved_as_pytorch_bin_scores_the_same(checkpoint, pairs, tmp_path):
    """Older saves hold pytorch_model.bin: read with torch.load(weights_only=True), the same scores."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-checkpoint"
    shutil.copytree(checkpoint["src"], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    scorer = build_scorer("unifilter", {**options(checkpoint), "model": str(folder)})
    samples = [
        Sample(key=str(i), uid=str(i), shard="s", image_bytes=jpeg, caption=text)
        for i, (jpeg, text) in enumerate(pairs[:2])
    ]
    for sample in samples:
        decode_sample(sample, DecodeSpec(shorter_side=scorer.image_size))
    reference = [reference_score(checkpoint, pilrgb(jpeg), text, True) for jpeg, text in pairs[:2]]
    assert [row["unifilter_score"] for row in scorer.score(samples)] == pytest.approx(reference, abs=TOL, rel=0)


# -- by hub id, from the Hugging Face cache, offline -------------------------------------------------

REPO, COMMIT = "tiny-org/UniFilter-Tiny", "0123456789abcdef0123456789abcdef01234567"
TOWER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(monkeypatch, tmp_path, checkpoint):
    """An offline Hugging Face cache holding the checkpoint under REPO and its tower under the id config.json names."""
    from mlmfilter.models.unifilter import inspect_unifilter

    cache = tmp_path / "hub"
    place_in_hub_cache(cache, REPO, checkpoint["src"], COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    inspect_unifilter.cache_clear()
    yield cache
    inspect_unifilter.cache_clear()


def score_cli(shard, run, *flags: str):
    """`mlmfilter score SHARD -o RUN --scorer unifilter FLAGS` as a user types it."""
    args = ["score", str(shard), "-o", str(run), "--scorer", "unifilter", *flags]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_cli_scores_a_hub_id_from_the_offline_cache(checkpoint, hub_cache, shard, pairs, tmp_path):
    place_in_hub_cache(hub_cache, checkpoint["layout"].tower_name, checkpoint["tower_dir"], TOWER_COMMIT)
    run = tmp_path / "run"
    flags = ("--model", REPO, "--device", "cpu", "--dtype", "fp32", "--batch-size", "3")
    result = score_cli(shard, run, *flags)
    assert result.exit_code == 0, result.output
    reference = [reference_score(checkpoint, pilrgb(jpeg), text, True) for jpeg, text in pairs]
    assert scores_of(run) == pytest.approx(reference, abs=TOL, rel=0)
    provenance = json.loads((run / "score" / "provenance.json").read_text())["scorers"]["unifilter"]
    assert provenance["model"]["hub_id"] == REPO and provenance["model"]["commit"] == COMMIT
    assert provenance["vision_tower"]["commit"] == TOWER_COMMIT
    # the same command again resumes: same identity, nothing scored twice
    again = score_cli(shard, run, *flags)
    assert again.exit_code == 0, again.output
    assert "already done" in again.output


def test_cli_names_a_missing_vision_tower_in_one_line(checkpoint, hub_cache, shard, tmp_path):
    result = score_cli(shard, tmp_path / "run", "--model", REPO, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert checkpoint["layout"].tower_name in result.output and "unifilter.vision_tower" in result.output
    assert "Traceback" not in result.output


def test_cli_names_a_model_missing_from_the_offline_cache(hub_cache, shard, tmp_path):
    result = score_cli(shard, tmp_path / "run", "--model", "nobody/no-such-unifilter", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "nobody/no-such-unifilter" in result.output and "Traceback" not in result.output


def test_scorers_lists_unifilter_and_its_column():
    result = CliRunner().invoke(app, ["scorers"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "unifilter" in result.output and "unifilter_score" in result.output
    assert "weizhiwang/UniFilter-Qwen2.5-1.5B" in result.output
