"""Training examples -> model inputs, through the judge's own request encoder.

The prompt half of every training sequence is produced by :class:`~mlmfilter.models.vlm_encoding.PromptEncoder`,
the same object the judge encodes its requests with at scoring time (conversation format, answer
prefix, LLaVA-style chunked tokenization, the processor's image-token expansion spliced in, pixel
budget). The answer half is the answer's tokens (a number spelled as the judge's score trie reads it:
no dummy-prefix space, the answer prefix already holds it) and the end of the answer
(:func:`mlmfilter.judge.conversations.end_of_answer`). Labels are ``-100`` on the prompt and the
padding: the loss is on the answer only. Images are decoded by :mod:`mlmfilter.images.decode`, the
pipeline's decode path, at the size the judge decodes to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mlmfilter.judge.backend import JudgeRequest
from mlmfilter.judge.conversations import AUTO, default_answer_prefix, end_of_answer, validate_conversation
from mlmfilter.models.vlm_encoding import TEXT_INPUT_KEYS, PromptEncoder
from mlmfilter.training.data import NOT_ENCODABLE, SkippedRecord, TrainingExample

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    row: int  # row of its image in the processor output


class TrainingEncoder:
    """Prompt + answer token ids and vision inputs for a batch of examples, as the judge encodes them."""

    def __init__(self, processor: Any, spec: Any, conversation: str, answer_prefix: str | None, max_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        self.conversation = validate_conversation(conversation)
        self.answer_prefix = default_answer_prefix(self.conversation) if answer_prefix is None else answer_prefix
        self.prompt_encoder = PromptEncoder(
            processor, spec.family, self.conversation, self.answer_prefix, spec.pixel_budget, max_length
        )
        self.end_text = end_of_answer(self.conversation, processor)
        self.end_ids = self._end_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- text -----------------------------------------------------------------------------------------

    def training_text(self, example: TrainingExample) -> tuple[str, str]:
        """(prompt, completion): the judge's exact request text, then the answer and its end."""
        return self.prompt_encoder.prompt_text(example.prompt), example.answer + self.end_text

    def answer_ids(self, answer: str) -> list[int]:
        ids = list(self.tokenizer(answer, add_special_tokens=False).input_ids)
        if not answer[:1].isspace():
            # SentencePiece's dummy prefix "▁": the answer prefix already holds the space (see judge.readout)
            while ids and not self.tokenizer.decode(ids[:1]).strip():
                ids = ids[1:]
        return ids + self.end_ids

    def _end_ids(self) -> list[int]:
        """The end of the answer as tokens: a reference stop string this tokenizer does not know as one
        token (``</s>`` on a ChatML tokenizer) becomes its EOS, which is what the model's own stop is."""
        vocab = self.tokenizer.get_vocab()
        if self.conversation != AUTO and self.end_text not in vocab:
            return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return list(self.tokenizer(self.end_text, add_special_tokens=False).input_ids)

    # -- images ---------------------------------------------------------------------------------------

    def load_image(self, example: TrainingExample):
        from mlmfilter.images.decode import DecodeSpec, decode_image

        image, _, _ = decode_image(example.image.read_bytes(), DecodeSpec(shorter_side=self.spec.decode_side))
        return image

    # -- a batch --------------------------------------------------------------------------------------

    def encode(self, examples: Sequence[TrainingExample]) -> tuple[list[EncodedExample | SkippedRecord], Any]:
        """Per example its ids + labels, or why it cannot be encoded; and the processor output (vision inputs)."""
        results: list[EncodedExample | SkippedRecord | None] = [None] * len(examples)
        requests, positions, answers = [], [], {}
        for i, example in enumerate(examples):
            try:
                image = self.load_image(example)
            except Exception as exc:
                results[i] = _skipped(example, f"image: {getattr(exc, 'message', None) or exc}")
                continue
            answers[i] = self.answer_ids(example.answer)
            requests.append(JudgeRequest(image, [example.prompt]))
            positions.append(i)
        longest_answer = max((len(a) for a in answers.values()), default=0)
        batch = self.prompt_encoder.encode(requests, positions, extra_tokens=longest_answer)
        for pos, failure in batch.failures.items():
            results[pos] = _skipped(examples[pos], f"{failure.reason}: {failure.detail}")
        for item in batch.items:
            prompt_ids = item.full[0]
            answer = answers[item.position]
            results[item.position] = EncodedExample(
                prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer, item.row
            )
        return results, batch.processed  # type: ignore[return-value]


def _skipped(example: TrainingExample, detail: str) -> SkippedRecord:
    return SkippedRecord(example.id, NOT_ENCODABLE, detail, str(example.image))


class JudgeCollator:
    """A Trainer data collator: rows ``{"index": i}`` of the example list -> a padded model batch."""

    def __init__(self, encoder: TrainingEncoder, examples: Sequence[TrainingExample]):
        self.encoder = encoder
        self.examples = examples

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        examples = [self.examples[int(f["index"])] for f in features]
        encoded, processed = self.encoder.encode(examples)
        bad = [e for e in encoded if isinstance(e, SkippedRecord)]
        if bad:  # the preflight check skipped every example it could not encode
            raise RuntimeError(f"example {bad[0].id} cannot be encoded during training: {bad[0].detail}")
        width = max(len(e.input_ids) for e in encoded)
        n = len(encoded)
        ids = torch.full((n, width), self.encoder.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
            attention[i, : len(e.input_ids)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        rows = [e.row for e in encoded]
        if rows != list(range(n)):
            raise RuntimeError("processor rows out of order")
        for key, value in processed.items():
            if key not in TEXT_INPUT_KEYS:
                batch[key] = value
        if "mm_token_type_ids" in processed:  # Qwen2-VL numbers positions from where the image tokens are
            batch["mm_token_type_ids"] = (ids == self.encoder.prompt_encoder.image_token_id).long()
        return batch


def preflight(encoder: TrainingEncoder, examples: Sequence[TrainingExample], chunk: int = 16):
    """(examples that encode, skipped records, token counts): every example is encoded once before
    training, so one that cannot be (too long for max_length, undecodable image) is skipped with its
    reason instead of stopping the run hours in."""
    ok: list[TrainingExample] = []
    skipped: list[SkippedRecord] = []
    lengths: list[int] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        encoded, _ = encoder.encode(part)
        for example, result in zip(part, encoded):
            if isinstance(result, SkippedRecord):
                skipped.append(result)
            else:
                ok.append(example)
                lengths.append(len(result.input_ids))
    return ok, skipped, lengths
