"""The MLM judge through an OpenAI-compatible server (``--backend openai``), against real servers on 127.0.0.1:

- a loopback server backed by a tiny real VLM returning log-probabilities in vLLM's format
  (tests/logprob_server.py): the top-k expected readout equals the transformers backend's exact one on the
  greedy path and stays within its stated per-row bound everywhere;
- ``transformers serve``: the generate path, and the clear refusal of the expected readout (no logprobs);
- the fault server: failures are per-pair error rows, nothing is lost, a second run is answered by the cache.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mlmfilter.core.sample import Sample
from mlmfilter.judge.backend import JudgeRequest, TopKDistribution
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.judge.readout import ExpectedScore, ScoreTrie
from mlmfilter.scorers.mlm import MLMOptions, MLMScorer
from tests.support.fault_server import FaultServer
from tests.support.logprob_server import LogprobServer
from tests.support.serve import save_tiny_served_llava, transformers_serve

CAPTIONS = ["A dog runs on grass .", "Two girls play with a ball in the park ."]


@pytest.fixture(scope="module")
def peaked_judge(tmp_path_factory):
    """A tiny random LLaVA whose digit and end-of-turn rows of the LM head are scaled up, so that numbers
    carry real mass (0.3-0.4) and the greedy answer is a number: the readout has something to get right."""
    from mlmfilter.models.tiny_vlm import build_tiny_vlm, fallback_tokenizer

    model, processor = build_tiny_vlm("llava", fallback_tokenizer(), seed=0, init_std=0.1)
    trie = ScoreTrie.from_tokenizer(processor.tokenizer)
    with torch.no_grad():
        rows = sorted(set(trie.continuation_ids) | {processor.tokenizer.eos_token_id})
        model.get_output_embeddings().weight[rows] *= 6.0
    # a chat template that renders a prefilled answer as the generation cue + the answer (as ChatML does;
    # the tiny LLaVA's own writes "ASSISTANT: " + answer but cues "ASSISTANT:"), so the trie walk can run
    processor.chat_template = processor.chat_template.replace(
        "message['role'].upper() + ': '", "message['role'].upper() + (':' if message['role'] == 'assistant' else ': ')"
    )
    folder = tmp_path_factory.mktemp("peaked-judge") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def _images():
    rng = np.random.RandomState(0)
    return [
        Image.fromarray((rng.rand(48, 64, 3) * 255).astype("uint8")),
        Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8")),
    ]


def _requests(metrics=("image_text_matching", "object_detail_fulfillment")):
    template = resolve_template("v2")
    return [
        JudgeRequest(image, [template.render(m, caption) for m in metrics])
        for image, caption in zip(_images(), CAPTIONS)
    ]


def _samples(captions=CAPTIONS):
    images = _images()
    return [
        Sample(uid=f"{i:032x}", shard="s", key=f"k{i}", caption=c, image=images[i % len(images)])
        for i, c in enumerate(captions)
    ]


def _exact(model_dir):
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.models.vlm import load_vlm

    backend = TransformersJudgeBackend(load_vlm(model_dir, "cpu", "fp32"), "auto", None, 4, None, trie_threshold=0.0)
    return backend, backend.score_distributions(_requests())


def _openai_options(model_dir, base_url, **backend_options):
    return MLMOptions(
        model=model_dir,
        metrics="itm,odf",
        conversation="auto",
        backend="openai",
        backend_options={"base_url": base_url, "image_format": "png", "max_retries": 1, **backend_options},
        min_mass=0.0,  # the peaked judge's numbers carry 0.3-0.4: below the floor, which is not tested here
    )


def test_top_k_readout_matches_exact_on_the_greedy_path_and_keeps_its_bound(peaked_judge):
    from mlmfilter.backends.openai import INFO as OPENAI

    exact_backend, exact = _exact(peaked_judge)
    greedy = exact_backend.generate(_requests())
    with LogprobServer(peaked_judge) as server:
        full = OPENAI.build(_openai_options(peaked_judge, server.base_url, token_ids=True, top_logprobs=4096))
        few = OPENAI.build(_openai_options(peaked_judge, server.base_url, top_logprobs=5))  # tokens named by text
        got_full, got_few = full.score_distributions(_requests()), few.score_distributions(_requests())
        assert full.generate(_requests()) == greedy  # same model, same chat template, same pixels (PNG)
        full.close(), few.close()
    walked_any = 0
    for r, (want, approx_full, approx_few) in enumerate(zip(exact, got_full, got_few)):
        assert isinstance(approx_full, TopKDistribution) and approx_full.log_probs.shape == (2, 101)
        for p in range(2):
            p_exact = np.exp(want[p])
            for approx in (approx_full, approx_few):
                p_approx, bound = np.exp(approx.log_probs[p]), float(approx.unplaced[p])
                assert 0 < bound < 1
                # the stated bound: every P(s) within `unplaced`, the L1 distance within twice it
                assert np.all(np.abs(p_approx - p_exact) <= bound + 1e-5)
                assert np.abs(p_approx - p_exact).sum() <= 2 * bound + 1e-5
            assert float(approx_few.unplaced[p]) >= float(approx_full.unplaced[p]) - 1e-6  # fewer entries, less placed
            # numbers on the greedy path were walked with the whole vocabulary: exact there
            text = greedy[r][p]
            walked = []  # numbers whose node the answer passed, with the step after it (its stop probability)
            for n in range(1, len(text)):
                head = text[:n]
                if not head.isdigit() or str(int(head)) != head or int(head) > 100:
                    break
                walked.append(int(head))
            for s in walked:
                walked_any += 1
                assert math.isclose(
                    float(np.exp(approx_full.log_probs[p][s])), float(p_exact[s]), rel_tol=1e-3, abs_tol=1e-7
                )
    assert walked_any >= 2  # the test compared real walked numbers, not only bounds


def test_scorer_columns_bound_and_provenance_come_from_the_backend(peaked_judge):
    from mlmfilter.backends.openai import TOP_K_BOUND, TOP_K_DEFINITION

    _, exact = _exact(peaked_judge)
    with LogprobServer(peaked_judge) as server:
        scorer = MLMScorer(_openai_options(peaked_judge, server.base_url, token_ids=True, top_logprobs=4096))
        assert {"itm_unplaced", "odf_unplaced"} <= set(scorer.columns)
        prov_before = scorer.provenance()
        rows = scorer.score(_samples())
        prov_after = scorer.provenance()
        scorer.close()
        assert scorer.backend is None
    assert prov_before["readout_definition"] == TOP_K_DEFINITION == prov_after["readout_definition"]
    assert prov_before["readout_bound"] == TOP_K_BOUND and prov_before["model"] == prov_after["model"]
    assert (
        prov_after["model"]["backend"] == "openai"
        and prov_after["model"]["conversation"]["source"] == "the server's chat template"
    )
    for row, want in zip(rows, exact):
        for short, dist in zip(("itm", "odf"), want):
            summary = ExpectedScore.from_log_probs(dist)
            bound = row[f"{short}_unplaced"]
            assert 0 < bound < 1 and abs(row[f"{short}_mass"] - summary.mass) <= 2 * bound + 1e-5
            assert 0 <= row[short] <= 100


def test_refusals_are_one_line_with_the_reason(peaked_judge):
    with pytest.raises(ValidationError, match="completions endpoint"):
        MLMOptions(
            model=peaked_judge, backend="openai", conversation="vicuna_v1", backend_options={"base_url": "http://x/v1"}
        )
    with pytest.raises(ValidationError, match="answer_prefix"):
        MLMOptions(model=peaked_judge, backend="openai", answer_prefix=" ", backend_options={"base_url": "http://x/v1"})
    with pytest.raises(ValidationError, match="max_concurency"):
        MLMOptions(backend="openai", backend_options={"max_concurency": 3})  # a typo, by name
    with pytest.raises(ValueError, match="--base-url"):
        MLMScorer(MLMOptions(model=peaked_judge, backend="openai", conversation="auto")).setup()
    no_tokenizer = MLMOptions(
        model="served-judge-without-files",
        backend="openai",
        conversation="auto",
        backend_options={"base_url": "http://127.0.0.1:9/v1"},
    )
    with pytest.raises(ValueError, match="tokenizer"):
        MLMScorer(no_tokenizer).setup()


def test_a_replica_at_another_address_resumes_the_run_but_another_model_does_not(peaked_judge):
    def identity(**backend_options):
        options = MLMOptions(model=peaked_judge, backend="openai", conversation="auto", backend_options=backend_options)
        return MLMScorer(options).identity()

    first = identity(base_url="http://node-a:8000/v1", max_concurrency=4)
    assert identity(base_url="http://node-b:8000/v1", max_concurrency=64) == first
    assert identity(base_url="http://node-a:8000/v1", served_model="another-judge") != first


@pytest.mark.slow
def test_transformers_serve_generate_path_and_no_logprobs_refusal(tmp_path_factory):
    from mlmfilter.core.errors import InfrastructureError

    model_dir = str(save_tiny_served_llava(tmp_path_factory.mktemp("served") / "model"))
    with transformers_serve(model_dir, tmp_path_factory.mktemp("serve-log")) as base_url:
        options = _openai_options(model_dir, base_url, max_concurrency=2, timeout_s=120)
        generate = MLMScorer(options.model_copy(update={"readout": "generate"}))
        rows = generate.score(_samples())
        stats = generate.backend.stats()
        generate.close()
        assert stats["answered"] == 4 and stats["completion_tokens"] > 0
        for row in rows:  # random weights write random text: parsed, or an unparseable row that keeps it
            assert row["itm_raw"] is not None and row["odf_raw"] is not None
        # the server's chat template and greedy decoding give what the transformers backend writes itself
        from mlmfilter.backends.openai import INFO as OPENAI
        from mlmfilter.backends.transformers import TransformersJudgeBackend
        from mlmfilter.models.vlm import load_vlm

        served = OPENAI.build(options.model_copy(update={"readout": "generate"}))
        local = TransformersJudgeBackend(load_vlm(model_dir, "cpu", "fp32"), "auto", None, 4)
        assert served.generate(_requests()) == local.generate(_requests())
        served.close()
        expected = MLMScorer(options)
        with pytest.raises(InfrastructureError, match="returned no log-probabilities.*readout=generate"):
            expected.score(_samples()[:1])
        expected.close()


def test_server_faults_are_rows_nothing_is_lost_and_a_rerun_hits_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-secret-0001")
    captions = [
        "A dog runs .",
        "A cat [fault:500] sleeps .",
        "A car [fault:malformed] parks .",
        "A boy [fault:nonnumeric] reads .",
        "  ",
    ]
    cache = tmp_path / "judge-cache.sqlite"
    with FaultServer() as server:

        def run():
            options = MLMOptions(
                model="served-judge",
                metrics="itm,odf",
                readout="generate",
                conversation="auto",
                backend="openai",
                backend_options={
                    "base_url": server.base_url,
                    "api_key_env": "JUDGE_KEY",
                    "cache": str(cache),
                    "timeout_s": 2.0,
                    "max_retries": 2,
                    "backoff_s": 0.05,
                },
            )
            scorer = MLMScorer(options)
            samples = _samples(captions)
            rows = scorer.score(samples)
            stats = scorer.backend.stats()
            scorer.close()
            return rows, samples, stats

        rows, samples, stats = run()
        assert len(rows) == len(captions)  # every pair has its row
        assert samples[0].error is None and rows[0]["itm"] is not None and rows[1]["itm"] is not None  # 500 retried
        assert samples[1].error is None and stats["retries"] >= 2
        assert samples[2].error == "judge_bad_response" and samples[3].error == "unparseable_score"
        assert rows[3]["itm_raw"].startswith("excellent") and samples[4].error == "empty_caption"
        assert all(h == "Bearer sk-judge-secret-0001" for h in server.authorization)
        body = server.bodies[0]
        assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        before = server.requests
        again_rows, again_samples, again = run()
        # the answered requests come from the cache; only the malformed pair's two prompts are asked again
        assert again["cache_hits"] == 6 and server.requests - before == 2 * 3
        assert [r["itm"] for r in again_rows] == [r["itm"] for r in rows]
    assert b"sk-judge-secret-0001" not in cache.read_bytes()
    assert json.dumps(stats)  # plain counters


def test_cli_score_with_the_openai_backend(tmp_path, flickr_pairs, monkeypatch):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app
    from tests.support.builders import flickr_shards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=3)
    runner = CliRunner()
    with FaultServer() as server:
        args = [
            "score",
            str(tmp_path / "in" / "*.tar"),
            "-o",
            str(tmp_path / "run"),
            "--scorer",
            "mlm",
            "--model",
            "served-judge",
            "--backend",
            "openai",
            "--base-url",
            server.base_url,
            "--readout",
            "generate",
            "--metrics",
            "itm",
            "--option",
            "mlm.backend_options={max_concurrency: 2, max_retries: 2, backoff_s: 0.05}",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert server.requests >= 3 and server.max_in_flight <= 2
    table = pq.read_table(next((tmp_path / "run" / "score" / "tables").glob("*.parquet")))
    assert table.num_rows == 3 and table.column("error").to_pylist() == [None] * 3, table.to_pylist()
    assert all(0 <= v <= 100 for v in table.column("itm").to_pylist())
    refused = runner.invoke(app, args[:-2] + ["--conversation", "vicuna_v1"])
    assert refused.exit_code == 2 and "completions endpoint" in refused.output
    lonely = runner.invoke(
        app,
        [
            "score",
            str(tmp_path / "in" / "*.tar"),
            "-o",
            str(tmp_path / "r2"),
            "--scorer",
            "rules",
            "--base-url",
            "http://127.0.0.1:9/v1",
        ],
    )
    assert lonely.exit_code != 0 and "--base-url" in lonely.output


def test_operational_settings_are_not_part_of_the_identity():
    def identity(**backend_options):
        options = MLMOptions(
            model="served-judge",
            readout="generate",
            backend="openai",
            backend_options={"base_url": "http://127.0.0.1:8000/v1", **backend_options},
        )
        return MLMScorer(options).identity()

    base = identity()
    assert (
        identity(max_concurrency=64, timeout_s=5, cache="/tmp/x.sqlite", max_retries=0) == base
    )  # a resume may retune
    assert identity(served_model="another-judge") != base and identity(image_size=336) != base


def test_trie_walk_with_continue_final_message_equals_the_exact_readout(peaked_judge):
    """vLLM's prefill extension lets the backend walk the whole adaptive trie: with the whole vocabulary as
    top-k and threshold 0 it is the transformers backend's exact readout; with k = 5 it keeps its bound."""
    from mlmfilter.backends.openai import INFO as OPENAI

    _, exact = _exact(peaked_judge)
    with LogprobServer(peaked_judge) as server:

        def walk(**settings):
            options = _openai_options(peaked_judge, server.base_url, trie_walk="continue_final_message", **settings)
            backend = OPENAI.build(options.model_copy(update={"trie_threshold": 0.0}))  # the whole trie
            out = backend.score_distributions(_requests()[:1])  # one pair: the whole trie is ~110 requests a prompt
            backend.close()
            return out

        before = server.requests
        full = walk(token_ids=True, top_logprobs=4096)
        asked_full = server.requests - before
        few = walk(top_logprobs=5)
        tiny_llava = save_tiny_served_llava(Path(tempfile.mkdtemp(prefix="cue-space-")) / "model")
        with pytest.raises(ValueError, match="renders a prefilled answer differently"):
            OPENAI.build(_openai_options(str(tiny_llava), server.base_url, trie_walk="continue_final_message"))
    assert asked_full > 2 * 100  # a root plus every trie node, per prompt
    for want, got_full, got_few in zip(exact, full, few):
        np.testing.assert_allclose(np.exp(got_full.log_probs), np.exp(want), atol=1e-6)
        assert np.all(got_full.unplaced < 1e-5)
        for p in range(2):
            bound = float(got_few.unplaced[p])
            assert 0 < bound < 1 and np.all(np.abs(np.exp(got_few.log_probs[p]) - np.exp(want[p])) <= bound + 1e-6)
