"""The enhance stage on real shards: selection from the score stage, decisions, stats, resume, reshard."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from mlmfilter import api
from mlmfilter.core import errors
from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage
from mlmfilter.io.readers import read_shard
from mlmfilter.io.sources import expand_inputs
from mlmfilter.judge.backend import RequestFailure
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support.builders import write_shard
from tests.support.enhance import ScriptedJudge, ScriptedWriter, by_caption
from tests.support.fault_server import FaultServer


@pytest.fixture
def pairs(flickr_pairs):
    return [(path, caption.strip()) for path, caption in flickr_pairs[:7]]


@pytest.fixture
def scenario(tmp_path, pairs):
    """Two real shards: 4 + 3 Flickr pairs, plus a broken JPEG in the second; scripted scores and rewrites."""
    caps = [c for _, c in pairs]
    samples0 = [{"key": f"0{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(pairs[:4])]
    samples1 = [{"key": f"1{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(pairs[4:])]
    broken = pairs[0][0].read_bytes()[:300]
    samples1.append({"key": "1x", "jpg": broken, "txt": "a broken photo of a dog"})
    write_shard(tmp_path / "in" / "00000000.tar", samples0)
    write_shard(tmp_path / "in" / "00000001.tar", samples1)
    better = {c: c.rstrip(" .") + " , seen in bright daylight" for c in caps}
    scores = {caps[0]: 80.0}  # a good pair: not selected by itm < 40
    scores.update({c: 20.0 for c in caps[1:]})
    scores["a broken photo of a dog"] = 10.0
    scores.update({better[caps[1]]: 70.0, better[caps[3]]: 60.0, better[caps[4]]: 22.0, better[caps[6]]: 95.0})
    rewrites = {
        caps[1]: [better[caps[1]]],  # accepted
        caps[2]: ["I'm sorry, I cannot see the image clearly enough to describe it."],  # refusal
        caps[3]: [caps[3].upper(), better[caps[3]]],  # a copy and a better one: the better one kept
        caps[4]: [better[caps[4]]],  # +2 < margin 5: not better
        caps[5]: RequestFailure(errors.SCORER_ERROR, "the writer fell over"),  # generation failed
        caps[6]: [(better[caps[6]], "length")],  # cut off at the token limit
    }
    return {"dir": tmp_path, "caps": caps, "better": better, "scores": scores, "rewrites": rewrites}


def _score(run_dir, scenario):
    inputs = [str(scenario["dir"] / "in" / "*.tar")]
    stage = ScoringStage(ScoringOptions(decode_workers=0), scorers=[ScriptedJudge(scenario["scores"])])
    summary = run_stage(run_dir, stage, sources=expand_inputs(inputs), inputs=inputs, read_options={})
    assert summary.ok, summary.shards_failed


def _enhance(run_dir, scenario, crash_on=None, **options):
    writer = ScriptedWriter(by_caption(scenario["rewrites"]), crash_on=crash_on)
    judge = ScriptedJudge(scenario["scores"])
    stage = EnhanceStage(
        EnhanceOptions(where="itm < 40", model="scripted-writer", judge=["mlm"], **options),
        generator=writer,
        scorers=[judge],
    )
    return run_stage(run_dir, stage), writer


def _rows(run_dir) -> dict[str, dict]:
    table = RunReader(run_dir).dataset("enhance").to_table()
    return {row["key"]: row for row in table.to_pylist()}


def test_enhance_stage_decides_every_selected_pair(tmp_path, scenario):
    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    summary, writer = _enhance(run_dir, scenario)
    assert summary.ok, summary.shards_failed
    caps, better = scenario["caps"], scenario["better"]
    rows = _rows(run_dir)
    # "00" scored 80: not selected; "1x" (broken JPEG) has no score, and missing values never pass
    assert sorted(rows) == ["01", "02", "03", "10", "11", "12"]
    assert all(caps[0] not in p for p in writer.prompts)

    assert rows["01"]["decision"] == "accepted" and rows["01"]["caption"] == better[caps[1]]
    assert rows["01"]["itm_before"] == 20.0 and rows["01"]["itm_after"] == 70.0 and rows["01"]["gain"] == 50.0
    assert rows["01"]["original_caption"] == caps[1] and rows["01"]["mode"] == "rewrite"
    assert rows["02"]["reason"] == "refusal" and rows["02"]["caption"] is None
    assert rows["03"]["caption"] == better[caps[3]] and rows["03"]["candidate_reasons"] == ["copy", "accepted"]
    assert rows["03"]["candidates"] == [caps[3].upper(), better[caps[3]]]
    assert rows["10"]["reason"] == "not_better" and rows["10"]["itm_after"] == 22.0 and rows["10"]["caption"] is None
    assert rows["11"]["reason"] == "generation_failed" and rows["11"]["error"] == errors.SCORER_ERROR
    assert "fell over" in rows["11"]["error_detail"]
    assert rows["12"]["reason"] == "truncated"
    assert all(r["error"] is None for k, r in rows.items() if k != "11")

    stats = RunReader(run_dir).stats("enhance")
    counters = stats["counters"]
    assert counters["selected"] == 6 and counters["tried"] == 6
    assert counters["accepted"] == 2 and counters["rejected"] == 4
    assert counters["gain_sum"] == pytest.approx(50.0 + 40.0)  # mean gain of accepted rewrites: 45
    for reason in ("refusal", "not_better", "generation_failed", "truncated"):
        assert counters[f"rejected:{reason}"] == 1
    assert stats["errors"] == {errors.SCORER_ERROR: 1}
    assert stats["blocks"]["mlm"]["done"] > 0  # the judge's work is in the stage's stats

    schema = pq.read_schema(RunReader(run_dir).table_files("enhance")[0])
    assert schema.names == [
        "uid",
        "shard",
        "key",
        "mode",
        "original_caption",
        "candidates",
        "candidate_reasons",
        "candidate_gains",
        "intermediate",
        "itm_before",
        "itm_after",
        "gain",
        "decision",
        "reason",
        "reason_detail",
        "caption",
        "error",
        "error_detail",
    ]
    provenance = RunReader(run_dir).provenance("enhance")
    assert provenance["compare"] == ["itm"] and provenance["generator"]["backend"] == "scripted"


def test_resume_after_a_crash_redoes_only_the_unfinished_shard(tmp_path, scenario):
    caps = scenario["caps"]
    reference = tmp_path / "reference"
    _score(reference, scenario)
    _enhance(reference, scenario)

    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    crashed, _ = _enhance(run_dir, scenario, crash_on=caps[4])  # dies inside shard 00000001
    assert list(crashed.shards_failed) == ["00000001"] and crashed.shards_completed == ["00000000"]
    assert list(RunReader(run_dir).completeness("enhance").missing) == ["00000001"]
    first_table = RunReader(run_dir).table_files("enhance")[0]
    mtime = (run_dir / "enhance" / "tables" / "00000000.parquet").stat().st_mtime_ns

    resumed, writer = _enhance(run_dir, scenario)
    assert resumed.ok and resumed.shards_skipped == ["00000000"] and resumed.shards_completed == ["00000001"]
    assert not any(c in p for p in writer.prompts for c in caps[:4])  # shard 0 was not redone
    assert (run_dir / "enhance" / "tables" / "00000000.parquet").stat().st_mtime_ns == mtime
    assert RunReader(run_dir).table_files("enhance")[0] == first_table

    def content(d):
        return {k: {c: v for c, v in r.items()} for k, r in _rows(d).items()}

    assert content(run_dir) == content(reference)


def test_a_resume_with_other_settings_is_refused(tmp_path, scenario):
    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    _enhance(run_dir, scenario)
    with pytest.raises(Exception, match="(?i)setting|fingerprint"):
        _enhance(run_dir, scenario, decision={"margin": 1.0})


def test_reshard_writes_accepted_rewrites_in_place_of_the_originals(tmp_path, scenario):
    caps, better = scenario["caps"], scenario["better"]
    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    _enhance(run_dir, scenario)
    selection = api.select(run_dir, expression="itm >= 0")
    stats = api.reshard(run_dir / "selection", tmp_path / "out", samples_per_shard=100, captions_stage="enhance")
    assert stats["captions_replaced"] == 2
    written = {s.key: s for source in expand_inputs([str(tmp_path / "out" / "*.tar")]) for s in read_shard(source)}
    by_original = {json.loads(json.dumps(s.meta)).get("original_caption", s.caption): s for s in written.values()}
    assert by_original[caps[1]].caption == better[caps[1]]
    assert by_original[caps[3]].caption == better[caps[3]]
    assert by_original[caps[3]].meta["original_caption"] == caps[3]
    for rejected in (caps[0], caps[2], caps[4]):  # not selected, refused, not better: the original stays
        assert by_original[rejected].caption == rejected and "original_caption" not in by_original[rejected].meta
    assert selection is not None


def test_where_must_name_a_judge_column():
    with pytest.raises(ValueError, match="compare"):
        EnhanceStage(
            EnhanceOptions(where="rules_ok", model="x", judge=["mlm"]),
            generator=ScriptedWriter(lambda p: []),
            scorers=[ScriptedJudge({})],
        )
    stage = EnhanceStage(
        EnhanceOptions(where="rules_ok and itm < 40 and clip_score > 0.2", model="x", judge=["mlm"]),
        generator=ScriptedWriter(lambda p: []),
        scorers=[ScriptedJudge({})],
    )
    assert stage.compare == ["itm"]


def test_aitqe_mode_keeps_recaptions_and_leaves_fine_captions(tmp_path, scenario):
    """AITQE's own answer drives the stage: a Recaption is checked and re-scored; none means judged fine."""
    caps = scenario["caps"]
    recaption = caps[1].rstrip(" .") + " , seen in bright daylight"
    answers = {caps[1]: '{"Recaption": "' + recaption + '", "Overall Score": "2'}

    def respond(prompt):
        for caption, answer in answers.items():
            if caption in prompt:
                return [answer]
        return ['{"Overall Score": "8']

    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    writer = ScriptedWriter(respond)
    stage = EnhanceStage(
        EnhanceOptions(where="itm < 40", mode="aitqe", model="aitqe", judge=["mlm"]),
        generator=writer,
        scorers=[ScriptedJudge(scenario["scores"])],
    )
    assert run_stage(run_dir, stage).ok
    assert all(p.startswith("Evaluate the caption: ") for p in writer.prompts)
    rows = _rows(run_dir)
    assert rows["01"]["decision"] == "accepted" and rows["01"]["caption"] == recaption
    assert rows["01"]["intermediate"] == [answers[caps[1]]]
    assert {rows[k]["reason"] for k in ("02", "03", "10", "11", "12")} == {"no_candidate"}
    assert RunReader(run_dir).settings("enhance")["options"]["mode"] == "aitqe"


def test_an_enhance_run_closes_its_served_judge(tmp_path, scenario):
    """The judge's HTTP client ends with the stage (seen from the server: its keep-alive connections end)."""
    run_dir = tmp_path / "run"
    _score(run_dir, scenario)
    with FaultServer() as server:
        judge = {
            "name": "mlm",
            "options": {
                "model": "served-judge",
                "metrics": "itm",
                "readout": "generate",
                "backend": "openai",
                "backend_options": {"base_url": server.base_url, "max_concurrency": 2, "timeout_s": 5.0},
            },
        }
        writer = ScriptedWriter(by_caption(scenario["rewrites"]))
        stage = EnhanceStage(EnhanceOptions(where="itm < 40", model="scripted-writer", judge=[judge]), generator=writer)
        summary = run_stage(run_dir, stage)
        assert summary.ok, summary.shards_failed
        assert server.requests > 0  # the originals and candidates were judged over HTTP
        assert server.wait_until_closed() == 0
        assert stage.scorers[0].backend is None
    rows = _rows(run_dir)
    judged = [r for r in rows.values() if r["reason"] in ("accepted", "not_better")]  # the others never reach it
    assert len(judged) == 3 and all(0 <= r["itm_before"] <= 100 and 0 <= r["itm_after"] <= 100 for r in judged)
