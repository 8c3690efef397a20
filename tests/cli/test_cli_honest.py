"""What a command says is what happened: the small things a demanding user notices, each seen
through the CLI (exit code and the lines printed) on real shards."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_score_into_a_selection_or_any_foreign_folder_is_refused(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=3)
    shard = tmp_path / "in" / "00000000.tar"
    invoke("score", shard, "-o", tmp_path / "run", "--scorer", "rules")
    invoke("select", tmp_path / "run", "--where", "rules_words >= 0")
    into_selection = invoke("score", shard, "-o", tmp_path / "run" / "selection", "--scorer", "rules", code=2)
    assert "is not empty and is a selection folder" in flat(into_selection.output)
    into_inputs = invoke("score", shard, "-o", tmp_path / "in", "--scorer", "rules", code=2)
    assert "is not empty and is not a run folder" in flat(into_inputs.output)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["00000000.tar"]  # nothing written there
    invoke("score", shard, "-o", tmp_path / "run", "--scorer", "rules")  # its own run folder: resumes
    (tmp_path / "empty").mkdir()
    invoke("score", shard, "-o", tmp_path / "empty", "--scorer", "rules")  # an empty folder is fine


def test_scorer_names_in_any_case_and_a_mistyped_local_model_folder(tmp_path, flickr_pairs, tiny_clip_dir, monkeypatch):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    shard = tmp_path / "in" / "00000000.tar"
    result = invoke("score", shard, "-o", tmp_path / "run", "--scorer", "RULES,Clip", "--model", tiny_clip_dir)
    assert "scored 2" in flat(result.output)
    typo = tiny_clip_dir.parent / (tiny_clip_dir.name + "x")
    mistyped = invoke("score", shard, "-o", tmp_path / "other", "--scorer", "clip", "--model", typo, code=2)
    assert f"no model folder '{typo}' here; did you mean '{tiny_clip_dir}'?" in flat(mistyped.output)
    monkeypatch.chdir(tiny_clip_dir.parent)  # a relative name, as typed beside the folder: no hub message
    relative = invoke("score", shard, "-o", tmp_path / "other", "--scorer", "clip", "--model", typo.name, code=2)
    assert f"no model folder '{typo.name}' here; did you mean '{tiny_clip_dir.name}'?" in flat(relative.output)
    assert "hf download" not in relative.output


def test_a_partition_shows_its_own_pairs_and_says_when_it_has_nothing_to_do(tmp_path, flickr_pairs):
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.runner import partition_sources

    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=2)
    inputs = str(tmp_path / "in" / "*.tar")
    shares = {i: partition_sources(expand_inputs([inputs]), f"{i}/8") for i in range(8)}
    busy = next(i for i, share in shares.items() if share)
    idle = next(i for i, share in shares.items() if not share)
    run = tmp_path / "run"
    first = invoke("score", inputs, "-o", run, "--scorer", "rules", "--partition", f"{busy}/8")
    assert f"pairs read {2 * len(shares[busy])}" in flat(first.output)
    others = [i for i, share in shares.items() if share and i != busy]
    for i in others:
        invoke("score", inputs, "-o", run, "--scorer", "rules", "--partition", f"{i}/8")
    nothing = invoke("score", inputs, "-o", run, "--scorer", "rules", "--partition", f"{idle}/8")
    text = flat(nothing.output)
    assert "pairs read 0" in text and "run folder 6 pairs in 3 shards (every job so far)" in text
    assert "nothing to do: this job holds no input shard" in text


def test_a_join_of_runs_that_share_no_pair_says_why_and_fails(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "a", n_shards=1, per_shard=3)
    flickr_shards(flickr_pairs, tmp_path / "b", n_shards=1, per_shard=3)
    (tmp_path / "b" / "00000000.tar").rename(tmp_path / "b" / "copy.tar")  # another file name: other uids
    invoke("score", tmp_path / "a", "-o", tmp_path / "ra", "--scorer", "rules")
    invoke("score", tmp_path / "b", "-o", tmp_path / "rb", "--scorer", "rules")
    result = invoke(
        "select",
        "a=" + str(tmp_path / "ra"),
        "b=" + str(tmp_path / "rb"),
        "--where",
        "a_rules_ok or b_rules_ok",
        "-o",
        tmp_path / "sel",
        code=1,
    )
    text = flat(result.output)
    assert "kept 0" in text and "no pair is in every run: they share no uid" in text


def test_reshard_of_scores_imported_without_their_shards_says_so(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:032x}" for i in range(3)],
                "key": ["a", "b", "c"],
                "image_text_matching_score": ["90", "10", "70"],
            }
        ),
        dumps / "00000000_image_text_matching.parquet",
    )
    run = tmp_path / "run"
    invoke("import", dumps, "-o", run)
    invoke("select", run, "--where", "itm >= 50")
    result = invoke("reshard", run / "selection", tmp_path / "out", code=2)
    assert "imported from score files without its shards" in flat(result.output)
    assert "--shards" in result.output and not (tmp_path / "out").exists()


def test_where_takes_in_and_answers_sql_habits(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=4)
    run = tmp_path / "run"
    invoke("score", tmp_path / "in", "-o", run, "--scorer", "rules")
    from mlmfilter.runs.read import RunReader

    words = sorted(set(RunReader(run).dataset("score").to_table()["rules_words"].to_pylist()))
    result = invoke("select", run, "--where", f"rules_words in ({words[0]}, {words[-1]})")
    assert "passed the expression" in result.output
    for text, hint in (
        ("rules_ok AND rules_words > 3", "write 'and' in lower case"),
        ("rules_words = 3", "compare with '==', not '='"),
    ):
        refused = invoke("select", run, "--where", text, code=2)
        assert hint in flat(refused.output), text
    help_text = flat(invoke("select", "--help").output)
    assert "error in ('empty_caption', 'truncated_image')" in help_text and "judge.rules_ok" in help_text
