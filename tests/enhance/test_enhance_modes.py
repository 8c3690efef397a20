"""Modes and prompts with a scripted writer: rewrite, fuse (CapsFusion) and AITQE's own answer."""

from __future__ import annotations

import pytest
from PIL import Image

from mlmfilter.backends.generation import SamplingParams
from mlmfilter.core import errors
from mlmfilter.enhance.modes import AitqeMode, FuseMode, RewriteMode
from mlmfilter.enhance.prompts import EnhancePrompts
from mlmfilter.judge.backend import RequestFailure
from tests.support.enhance import ScriptedWriter

IMAGE = Image.new("RGB", (32, 32), "white")


def test_rewrite_prompt_quotes_the_caption_and_braces_are_safe():
    writer = ScriptedWriter(lambda p: ["a {weird} caption, fixed"])
    written = RewriteMode(writer, EnhancePrompts(), SamplingParams()).write([IMAGE], ["a {weird} caption"])
    assert '"a {weird} caption"' in writer.prompts[0]
    assert [g.text for g in written[0].texts] == ["a {weird} caption, fixed"] and written[0].failure is None


def test_prompts_are_configurable_and_checked():
    prompts = EnhancePrompts(rewrite="Fix this caption: {caption}")
    assert prompts.render_rewrite("a dog") == "Fix this caption: a dog"
    with pytest.raises(ValueError, match="caption"):
        EnhancePrompts(rewrite="Fix the caption.")
    with pytest.raises(ValueError, match="synthetic"):
        EnhancePrompts(fuse="Merge {caption} with {other}")
    with pytest.raises(ValueError, match="literal braces"):
        EnhancePrompts(rewrite='Answer as {"caption": {caption}}')
    with pytest.raises(ValueError, match="literal braces"):
        EnhancePrompts(rewrite="Fix {caption")
    assert (
        EnhancePrompts(rewrite='Answer as {{"caption": "{caption}"}}').render_rewrite("a dog")
        == 'Answer as {"caption": "a dog"}'
    )
    assert EnhancePrompts().sha256() != prompts.sha256()
    assert any(
        "Sentence 1 provides detailed real-world knowledge" in t for t in EnhancePrompts().instruction_texts("fuse")
    )


def test_fuse_describes_then_merges_each_description_with_the_raw_caption():
    def respond(prompt):
        if prompt.startswith("Describe"):
            return ["a man on a red bicycle", "a cyclist in a city street"]
        assert "Sentence 1: Tour de France 2019 Paris" in prompt
        return ["Tour de France 2019 in Paris: " + prompt.split("Sentence 2: ")[1].split("\n")[0]]

    writer = ScriptedWriter(respond)
    (written,) = FuseMode(writer, EnhancePrompts(), SamplingParams(n=2, temperature=1.0)).write(
        [IMAGE], ["Tour de France 2019 Paris"]
    )
    assert written.intermediate == ["a man on a red bicycle", "a cyclist in a city street"]
    assert [g.text for g in written.texts] == [
        "Tour de France 2019 in Paris: a man on a red bicycle",
        "Tour de France 2019 in Paris: a cyclist in a city street",
    ]
    assert len(writer.prompts) == 3  # one description request (n=2), then one fusion per description


def test_fuse_reports_a_failed_description():
    writer = ScriptedWriter(lambda p: RequestFailure(errors.CAPTION_TOO_LONG, "too long"))
    (written,) = FuseMode(writer, EnhancePrompts(), SamplingParams()).write([IMAGE], ["x"])
    assert written.texts == [] and written.failure.startswith("describe: caption_too_long")


AITQE_POOR = '{"Recaption": "A man stands in front of a checklist of customer service questions", "Overall Score": "2'
AITQE_FINE = '{"Overall Score": "8'
AITQE_CUT = '{"Recaption": "A man stands in front of a checklist of cust'


def test_aitqe_mode_takes_the_recaption_when_the_model_gives_one():
    from mlmfilter.judge import aitqe

    answers = {"poor caption": [AITQE_POOR], "fine caption": [AITQE_FINE], "cut caption": [(AITQE_CUT, "length")]}
    writer = ScriptedWriter(lambda p: next(v for k, v in answers.items() if k in p))
    mode = AitqeMode(writer)
    assert mode.params.stop == (aitqe.OVERALL_MARKER,) and mode.params.max_new_tokens == aitqe.MAX_NEW_TOKENS
    poor, fine, cut = mode.write([IMAGE] * 3, ["poor caption", "fine caption", "cut caption"])
    assert writer.prompts[0] == aitqe.prompt("poor caption")  # AITQE's own question
    assert [g.text for g in poor.texts] == ["A man stands in front of a checklist of customer service questions"]
    assert not poor.texts[0].truncated and poor.intermediate == [AITQE_POOR]
    assert fine.texts == [] and fine.failure is None  # judged fine: no candidate (decided as no_candidate)
    assert cut.texts[0].truncated  # a cut-off recaption is checked, and rejected, as truncated
