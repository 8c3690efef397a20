"""Every prompt the enhancer sends, in one place, configurable as one :class:`EnhancePrompts` model.

- ``rewrite``: the caption rewritten to match the image with as few changes as possible (AITQE's
  "minimal adjustment"), keeping the original's language and specifics. Placeholder ``{caption}``.
- ``describe``: the synthetic caption of ``fuse``'s first step (a plain description of the image).
- ``fuse``: CapsFusion's fusion instruction (baaivision/CapsFusion ``capsfusion_inference.py``,
  quoted in shared/reference/released_judges.md 3.5), with ``{caption}`` (the raw caption,
  "Sentence 1") and ``{synthetic}`` (the VLM's description, "Sentence 2").

Templates are filled with :meth:`str.format` on the named placeholders only, so braces inside a
caption never break a prompt; a template naming any other field is refused when it is configured.
"""

from __future__ import annotations

import string

from pydantic import BaseModel, ConfigDict, model_validator

from mlmfilter.core.ids import canonical_sha256

REWRITE_PROMPT = (
    'This image comes with the caption: "{caption}"\n'
    "Rewrite the caption so that it describes the image correctly. Change as little as possible: "
    "keep everything in it that is right, write in the same language, and keep its names, places, "
    "numbers and brands. Answer with the new caption only."
)
DESCRIBE_PROMPT = "Describe this image in one sentence. Answer with the description only."
FUSE_PROMPT = (
    "Please merge and refine the information from the two given sentences. Sentence 1 provides detailed "
    "real-world knowledge, yet it suffers from flaws in sentence structure and grammar. Sentence 2 exhibits "
    "nice sentence structure, but lacking in-depth real-world details and may contain false information. "
    "Please combine them into a new sentence, ensuring a well-structured sentence while retaining the "
    "detailed real-world information provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
    "Sentence 1: {caption}\n"
    "Sentence 2: {synthetic}\n"
    "New Sentence:"
)

#: placeholders each template may (and must) use
PLACEHOLDERS: dict[str, tuple[str, ...]] = {"rewrite": ("caption",), "describe": (), "fuse": ("caption", "synthetic")}


def placeholders_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class EnhancePrompts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rewrite: str = REWRITE_PROMPT
    describe: str = DESCRIBE_PROMPT
    fuse: str = FUSE_PROMPT

    @model_validator(mode="after")
    def _placeholders(self) -> "EnhancePrompts":
        for field, wanted in PLACEHOLDERS.items():
            template = getattr(self, field)
            try:
                found = placeholders_of(template)
            except ValueError as exc:
                raise ValueError(
                    f"prompt {field!r} is not a valid template ({exc}); write literal braces as {{{{ }}}}"
                ) from None
            if found != set(wanted):
                need = ", ".join("{" + w + "}" for w in wanted) or "no placeholder"
                raise ValueError(
                    f"prompt {field!r} must use {need}, found {sorted(found)} (write literal braces as {{{{ }}}})"
                )
        return self

    def render_rewrite(self, caption: str) -> str:
        return self.rewrite.format(caption=caption)

    def render_describe(self) -> str:
        return self.describe.format()

    def render_fuse(self, caption: str, synthetic: str) -> str:
        return self.fuse.format(caption=caption, synthetic=synthetic)

    def instruction_texts(self, mode: str) -> list[str]:
        """The literal text of the templates a mode sends (what must not leak into a caption)."""
        fields = {"rewrite": ["rewrite"], "fuse": ["describe", "fuse"]}.get(mode, [])
        texts = []
        for field in fields:
            for literal, _, _, _ in string.Formatter().parse(getattr(self, field)):
                if literal.strip():
                    texts.append(literal)
        return texts

    def sha256(self) -> str:
        return canonical_sha256(self.model_dump())
