"""Judge requests -> the exact token ids the model reads (one job: text and image in, ids out).

Per pair the processor runs once, on the first prompt; its expansion of the image placeholder
(image tokens, Idefics3's tile grid, Qwen2-VL's vision markers) is spliced into the token ids of
every other prompt. The splice is checked: the processor's ids for the first prompt must equal the
tokenizer's ids with the one image token replaced by the expansion.

Tokenization follows the conversation format: the reference formats encode the text before and after
the image token apart, as LLaVA's ``tokenizer_image_token`` does (for SentencePiece tokenizers the
chunk after the image gets its own dummy-prefix space, exactly as in the reference); ``auto`` encodes
the whole chat-template text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from mlmfilter.core import errors
from mlmfilter.judge.backend import JudgeRequest, RequestFailure
from mlmfilter.judge.conversations import AUTO, FORMATS, render_with_chat_template
from mlmfilter.models.vlm_families import VlmFamily

#: the processor outputs that are text (token ids and their masks); every other tensor it returns is a
#: vision input (pixel values, image grids, tile masks) that goes to the model as it is
TEXT_INPUT_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})


@dataclass
class EncodedPair:
    """One request after tokenization: full token ids per prompt (image tokens expanded)."""

    position: int  # index into the caller's request list
    row: int  # row of its image in the processor batch
    full: list[list[int]]
    prefix_len: int  # tokens shared by all prompts (the longest common prefix, less one if needed)


@dataclass
class EncodedBatch:
    items: list[EncodedPair]
    processed: Any  # the processor's BatchFeature: vision inputs of every row
    failures: dict[int, RequestFailure] = field(default_factory=dict)
    #: per item, its image features when already encoded (a micro-batch of a larger encoded chunk)
    features: list[Any] | None = None


class PromptTooLong(ValueError):
    pass


class PromptEncoder:
    def __init__(
        self,
        processor: Any,
        family: VlmFamily,
        conversation: str,
        answer_prefix: str,
        pixel_budget: int | None,
        max_length: int,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.conversation = conversation
        self.answer_prefix = answer_prefix
        self.pixel_budget = pixel_budget
        self.max_length = max_length
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(family.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {family.image_token!r} token")
        probe = list(self.tokenizer("a").input_ids)
        bos = self.tokenizer.bos_token_id
        self._tokenizer_adds_bos = bos is not None and bool(probe) and probe[0] == bos

    # -- one prompt -------------------------------------------------------------------------------------

    def prompt_text(self, prompt: str) -> str:
        """The exact text the model reads for one prompt (image placeholder not yet expanded)."""
        if self.conversation == AUTO:
            text = render_with_chat_template(self.processor, prompt)
        else:
            text = FORMATS[self.conversation].render(prompt, self.family.image_placeholder)
        return text + self.answer_prefix

    def add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add BOS unless a chat template already wrote it."""
        bos = self.tokenizer.bos_token
        return not (self.conversation == AUTO and bos and text.startswith(bos))

    def token_ids(self, text: str) -> list[int]:
        """Token ids of a prompt text with one image token (not yet expanded)."""
        if self.conversation == AUTO:
            return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens(text)).input_ids)
        # LLaVA's tokenizer_image_token: chunks around the image token are encoded apart, BOS kept once.
        # LLaVA drops a first token equal to BOS from later chunks; here only a BOS the tokenizer added,
        # so a template that starts with the BOS string (ChatML with SmolLM2's tokenizer) stays whole.
        fmt = FORMATS[self.conversation]
        forced = fmt.force_answer_token and bool(self.answer_prefix) and text.endswith(self.answer_prefix)
        if forced:  # the scripts append tokenizer(" ").input_ids[-1] after the encoded prompt
            text = text[: -len(self.answer_prefix)]
        pieces = text.split(self.family.image_token)
        apart = fmt.split_after_image
        chunks = [list(self.tokenizer(pieces[0]).input_ids)]
        for piece in pieces[1:]:
            if apart and piece.startswith(apart):  # AITQE: its processor's newline is encoded on its own
                head = list(self.tokenizer(apart).input_ids)
                chunks.append(
                    head + list(self.tokenizer(piece[len(apart) :]).input_ids)[1 if self._tokenizer_adds_bos else 0 :]
                )
            else:
                chunks.append(list(self.tokenizer(piece).input_ids))
        offset = 1 if self._tokenizer_adds_bos else 0
        ids = [chunks[0][0]] if offset else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(self.image_token_id)
            ids.extend(chunk[offset:])
        if forced:
            ids.append(list(self.tokenizer(self.answer_prefix, add_special_tokens=False).input_ids)[-1])
        return ids

    def fit_budget(self, image: Image.Image) -> Image.Image:
        """RGB, and downscaled (aspect kept) when above the pixel budget."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        if self.pixel_budget and width * height > self.pixel_budget:
            scale = math.sqrt(self.pixel_budget / (width * height))
            image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)
        return image

    def process(self, texts: list[str], images: list[Image.Image]):
        """The model's own processor on texts (one image each)."""
        return self.processor(
            text=texts,
            images=[[image] for image in images],
            return_tensors="pt",
            padding=True,
            add_special_tokens=self.add_special_tokens(texts[0]),
        )

    # -- a micro-batch ----------------------------------------------------------------------------------

    def encode(self, requests: Sequence[JudgeRequest], positions: Sequence[int], extra_tokens: int) -> EncodedBatch:
        """Token ids of every prompt of every request; a request that cannot be encoded fails alone.

        ``extra_tokens``: answer tokens that must still fit within ``max_length``.
        """
        failures: dict[int, RequestFailure] = {}
        texts: list[list[str]] = []
        images: list[Image.Image] = []
        live: list[int] = []
        for pos, request in zip(positions, requests):
            try:
                if not request.prompts:
                    raise ValueError("a request needs at least one prompt")
                if any(self.family.image_token in p for p in request.prompts):
                    raise ValueError(f"the prompt contains the image token {self.family.image_token!r}")
                texts.append([self.prompt_text(p) for p in request.prompts])
                images.append(self.fit_budget(request.image))
                live.append(pos)
            except Exception as exc:
                failures[pos] = _failure(exc)
        processed, rows = self._process_isolated([t[0] for t in texts], images, live, failures)
        items = []
        for pos, prompt_texts in zip(live, texts):
            if pos in failures:
                continue
            try:
                full = self._expand(processed, rows[pos], prompt_texts)
                items.append(self._pair(pos, rows[pos], full, extra_tokens))
            except PromptTooLong as exc:
                failures[pos] = RequestFailure(errors.CAPTION_TOO_LONG, str(exc))
            except Exception as exc:
                failures[pos] = _failure(exc)
        return EncodedBatch(items, processed, failures)

    def _process_isolated(self, first_texts, images, live, failures):
        """Processor output for all live requests; a request the processor rejects fails alone."""
        if not live:
            return None, {}
        try:
            return self.process(first_texts, images), {pos: row for row, pos in enumerate(live)}
        except Exception as exc:
            if len(live) == 1:
                failures[live[0]] = _failure(exc, "image preprocessing")
                return None, {}
        keep = []
        for text, image, pos in zip(first_texts, images, live):
            try:
                self.process([text], [image])
                keep.append((text, image, pos))
            except Exception as exc:
                failures[pos] = _failure(exc, "image preprocessing")
        if not keep:
            return None, {}
        processed = self.process([k[0] for k in keep], [k[1] for k in keep])
        return processed, {pos: row for row, (_, _, pos) in enumerate(keep)}

    def _expand(self, processed, row: int, texts: list[str]) -> list[list[int]]:
        """Splice the processor's image-token expansion (checked on the first prompt) into every prompt."""
        mask = processed["attention_mask"][row].bool()
        proc_ids = processed["input_ids"][row][mask].tolist()
        whole = list(self.tokenizer(texts[0], add_special_tokens=self.add_special_tokens(texts[0])).input_ids)
        k = _single_index(whole, self.image_token_id)
        head, tail = whole[:k], whole[k + 1 :]
        end = len(proc_ids) - len(tail)
        if proc_ids[:k] != head or proc_ids[end:] != tail or end <= k:
            raise RuntimeError("the processor's output does not match the tokenizer's around the image")
        expansion = proc_ids[k:end]
        full = []
        for text in texts:
            ids = self.token_ids(text)
            j = _single_index(ids, self.image_token_id)
            full.append(ids[:j] + expansion + ids[j + 1 :])
        return full

    def _pair(self, pos: int, row: int, full: list[list[int]], extra_tokens: int) -> EncodedPair:
        longest = max(len(ids) for ids in full)
        if longest + extra_tokens > self.max_length:
            raise PromptTooLong(
                f"prompt of {longest} tokens + {extra_tokens} answer tokens exceeds max_length={self.max_length} "
                "(refused rather than cutting off the assistant cue)"
            )
        # every prompt keeps >= 1 token of its own: its last token's logits start its answer
        prefix_len = min(_common_prefix_length(full), min(len(ids) for ids in full) - 1)
        last_image = max(i for i, t in enumerate(full[0]) if t == self.image_token_id)
        if prefix_len <= last_image:
            raise RuntimeError("the prompts do not share the image: put the image before the prompt text")
        return EncodedPair(pos, row, full, prefix_len)


def _failure(exc: Exception, stage: str = "") -> RequestFailure:
    where = f"{stage}: " if stage else ""
    return RequestFailure(errors.SCORER_ERROR, f"{where}{type(exc).__name__}: {exc}")


def _single_index(ids: list[int], token: int) -> int:
    hits = [i for i, t in enumerate(ids) if t == token]
    if len(hits) != 1:
        raise ValueError(f"expected one image token in the prompt, found {len(hits)}")
    return hits[0]


def _common_prefix_length(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n
