"""One judge, one number: enhance's "before" is the run's own score of the pair and its "after" of a
rewrite is what `score` gives that caption, with a real tiny judge on real Flickr photos in fp32.

The run scores with the judge and CLIP side by side (CLIP wants 224 px, the judge its own size) and the
writer wants yet another size: each must still see exactly the pixels it sees alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support import mlm as mlm_support
from tests.support.builders import write_shard
from tests.support.enhance import ScriptedWriter, by_caption, one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

TOLERANCE = 1e-4  # on 0..100, fp32
WRITER_SIDE = 64  # the writer decodes at a size no judge wants


class SizedWriter(ScriptedWriter):
    """A scripted writer that, like a loaded VLM writer, names the image size it wants, and records the
    sizes it was given."""

    def __init__(self, respond):
        super().__init__(respond)
        self.loaded = SimpleNamespace(spec=SimpleNamespace(image_size=WRITER_SIDE, decode_side=WRITER_SIDE))
        self.sides: list[int] = []

    def generate(self, requests, params):
        self.sides += [min(r.image.size) for r in requests]
        return super().generate(requests, params)


SUFFIXES = (" , seen on a bright day", " , in a photograph", " : people and animals outdoors")


def _shards(folder, pairs, per_shard: int = 4):
    """Shards of ``per_shard`` real photos each, with the given captions; keys name photo and caption."""
    samples = [
        {"key": f"{i:03d}-{n}", "jpg": path.read_bytes(), "txt": caption} for n, (i, path, caption) in enumerate(pairs)
    ]
    for start in range(0, len(samples), per_shard):
        write_shard(folder / f"{start // per_shard:05d}.tar", samples[start : start + per_shard])
    return [str(folder / "*.tar")]


def _score(run_dir, inputs, scorers):
    summary = run_stage(
        run_dir,
        ScoringStage(ScoringOptions(scorers=scorers, decode_workers=1)),  # the pool, as `mlmfilter score` runs
        sources=expand_inputs(inputs),
        inputs=inputs,
        read_options={},
    )
    assert summary.ok, summary.shards_failed
    return RunReader(run_dir).dataset("score").to_table().to_pylist()


@pytest.fixture(scope="module", params=["llava", "pooled_llava"])
def scored(request, tmp_path_factory, flickr_pairs, smollm2_cache_dir, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp(f"same-number-{request.param}")
    pairs = [(i, path, caption.strip()) for i, (path, caption) in enumerate(flickr_pairs[:8])]
    model = str(mlm_support.tiny_model_dir(request.param, smollm2_cache_dir))
    options = {"model": model, "metrics": "itm,odf", "device": "cpu", "dtype": "fp32", **mlm_support.no_mass_floor()}
    judge = {"name": "mlm", "options": options}
    clip = {"name": "clip", "options": {"model": str(tiny_clip_dir), "device": "cpu"}}
    run_dir = tmp / "run"
    run_scores = {row["key"]: row for row in _score(run_dir, _shards(tmp / "in", pairs), [judge, clip])}
    rewrites = {caption: [caption.rstrip(" .") + suffix for suffix in SUFFIXES] for _, _, caption in pairs}
    # `mlmfilter score` of every rewritten caption: the judge alone (its own decode), other batch mates
    candidates = [(i, path, text) for i, path, caption in pairs for text in rewrites[caption]]
    rows = _score(tmp / "rewritten", _shards(tmp / "in2", candidates, per_shard=7), [judge])
    rewritten = {(row["key"].split("-")[0], text): row for row, (_, _, text) in zip(rows, candidates)}
    return SimpleNamespace(run=run_dir, judge=judge, scores=run_scores, rewrites=rewrites, rewritten=rewritten)


def _enhance(scored, stage: str, judge: dict) -> tuple[dict[str, dict], SizedWriter]:
    writer = SizedWriter(by_caption(scored.rewrites))
    options = EnhanceOptions(
        where="itm <= 100",
        model="scripted-writer",
        judge=[judge],
        decision={"margin": 0.0, "compare": ["itm", "odf"]},
        checks={"keep_entities": False},
    )
    summary = run_stage(scored.run, EnhanceStage(options, name=stage, generator=writer))
    assert summary.ok, summary.shards_failed
    rows = {row["key"]: row for row in RunReader(scored.run).dataset(stage).to_table().to_pylist()}
    assert len(rows) == 8
    return rows, writer


def _check_same_numbers(scored, rows, exact_before: bool) -> None:
    accepted = 0
    for key, row in rows.items():
        assert row["error"] is None, row
        photo = key.split("-")[0]
        gains = row["candidate_gains"]
        best = row["candidates"][max(range(len(gains)), key=lambda n: gains[n])]
        for column in ("itm", "odf"):
            before = row[f"{column}_before"]
            assert before is not None, row
            if exact_before:
                assert before == scored.scores[key][column], (key, column)
            assert abs(before - scored.scores[key][column]) <= TOLERANCE, (key, column, before)
            # the best candidate's after, accepted or not, is `score` of that caption
            after = scored.rewritten[(photo, best)][column]
            assert abs(row[f"{column}_after"] - after) <= TOLERANCE, (key, column, row[f"{column}_after"], after)
        accepted += row["decision"] == "accepted"
        if row["decision"] == "accepted":
            assert row["caption"] == best
    assert 0 < accepted < 8  # the margin (0) really decides: some rewrites win, some lose


def test_enhance_decides_on_the_runs_own_score_and_scores_rewrites_as_score_does(scored):
    rows, writer = _enhance(scored, "enhance", scored.judge)
    _check_same_numbers(scored, rows, exact_before=True)
    assert writer.sides and all(side == WRITER_SIDE for side in writer.sides)  # the writer's own decode
    provenance = RunReader(scored.run).provenance("enhance")
    assert "run's own scores" in provenance["before"]


def test_a_judge_that_rescores_the_original_gets_the_runs_number(scored):
    # the same model and settings, named differently (max_length = the model's own): not the run's
    # recorded scorer, so the original is scored again, and must come out as the run recorded it
    judge = {"name": "mlm", "options": {**scored.judge["options"], "max_length": 4096}}
    rows, _ = _enhance(scored, "enhance-rescored", judge)
    _check_same_numbers(scored, rows, exact_before=False)
