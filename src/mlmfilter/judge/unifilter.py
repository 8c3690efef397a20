"""UniFilter's request and readout: what its quality classifier is shown and what its one number means.

UniFilter (Victorwz/UniFilter, arXiv 2510.15162; ``weizhiwang/UniFilter-Qwen2.5-1.5B``,
``weizhiwang/UniFilter-Qwen3-0.6B``) is a LLaVA-Unified model whose language-model head is replaced
by a linear score head read at the last token: one forward per pair, one float, nothing generated.
There is no prompt template and no conversation format. What the released caption scorer
(``data_scoring/data_quality_classifier_caption_scoring.py``) does with a caption (the training
dataset, ``LazySupervisedClassificationDataset``, tokenises its text field the same way):

* the text is ``"<image>\\n" + caption``, a literal ``<image>`` inside the caption written ``image``;
* it is tokenised in pieces around the placeholder (LLaVA's ``tokenizer_image_token``: a BOS the
  tokenizer puts in front of every piece is kept once, at the start);
* the BOS is put in front unless the ids already start with it (the Qwen checkpoints' BOS is the
  ``<s>`` their training code added to the tokenizer), the EOS appended unless they end with it;
* the released script keeps the first 75 ids of each row (placeholder, BOS and EOS counted: a long
  caption loses its EOS and is read at its 75th token); training kept up to
  ``tokenizer_model_max_length`` (thousands: every caption whole);
* the attention mask is ``ids != pad_id`` and the model drops masked ids before it splices the image
  in, so an id equal to the pad id is never seen (where EOS == pad, the EOS is dropped too).

Readout (``LlavaQwenClassifier``): the head's output at the row's last kept position. A head of one
row (``num_labels`` 1, the released training script's setting: mean-squared error towards quality
levels 0, 1, 2, 3) gives the raw regression value, higher is better, not clamped; a head of two or more
rows gives the softmax probability of row 1 (the positive class), as the released scorer writes it.

Nothing here imports torch: the tokenizer is any callable returning ``input_ids``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

#: where the image's features go (LLaVA's ``<image>`` and its ``IMAGE_TOKEN_INDEX``)
IMAGE_PLACEHOLDER = "<image>"
IMAGE_MARKER = -200
#: ids the released scorer keeps per row (``DataCollatorForImagePreprocessing(..., max_len=75)``)
RELEASED_SCRIPT_MAX_IDS = 75

Settings = Literal["released-script", "trained"]
SETTINGS: tuple[str, ...] = ("released-script", "trained")


@dataclass(frozen=True)
class UniFilterRequest:
    """Everything about the request that changes a score (recorded in provenance)."""

    settings: str  # "released-script" / "trained"
    pad_to_square: bool  # expand to a mean-colour square before the image processor
    max_ids: int | None  # ids kept per row before the image is spliced in (None: all)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_settings(settings: Settings, trained_pad_to_square: bool) -> UniFilterRequest:
    """The released scorer's request (no padding, 75 ids) or the training data's (the checkpoint's
    ``image_aspect_ratio``: ``pad`` pads to a square; whole captions)."""
    if settings == "released-script":
        return UniFilterRequest(settings, pad_to_square=False, max_ids=RELEASED_SCRIPT_MAX_IDS)
    if settings == "trained":
        return UniFilterRequest(settings, pad_to_square=trained_pad_to_square, max_ids=None)
    raise ValueError(f"checkpoint_settings must be one of {', '.join(SETTINGS)}, got {settings!r}")


def request_text(caption: str) -> str:
    """The classifier's whole text input for a caption pair."""
    return IMAGE_PLACEHOLDER + "\n" + caption.replace(IMAGE_PLACEHOLDER, "image")


def split_on_image(ids: list[int]) -> tuple[list[int], list[int]]:
    """(ids before the image, ids after it); the request holds exactly one placeholder."""
    at = ids.index(IMAGE_MARKER)
    return ids[:at], ids[at + 1 :]


class RequestTokenizer:
    """Token ids of requests, as the released scorer builds each row (see the module docstring)."""

    def __init__(self, tokenizer: Any, request: UniFilterRequest):
        self.tokenizer = tokenizer
        self.request = request
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        # the piece before the placeholder is always empty: tokenised once
        self._head = list(tokenizer("").input_ids)

    def ids(self, captions: list[str]) -> list[list[int]]:
        """One row of ids per caption, with :data:`IMAGE_MARKER` where the image goes."""
        tails = self.tokenizer([request_text(c)[len(IMAGE_PLACEHOLDER) :] for c in captions]).input_ids
        return [self._row(list(tail)) for tail in tails]

    def _row(self, tail: list[int]) -> list[int]:
        head = self._head
        # tokenizer_image_token: when the tokenizer starts every piece with its BOS, the first piece
        # keeps it and the later pieces lose their first id
        skip = 1 if head and self.bos is not None and head[0] == self.bos else 0
        ids = head + [IMAGE_MARKER] + tail[skip:]
        if self.bos is not None and ids[0] != self.bos:
            ids.insert(0, self.bos)
        if self.eos is not None and ids[-1] != self.eos:
            ids.append(self.eos)
        if self.request.max_ids is not None:
            ids = ids[: self.request.max_ids]
        if self.pad is not None:  # the attention mask is ids != pad, and masked ids are dropped
            ids = [i for i in ids if i != self.pad]
        return ids


def score_definition(num_labels: int) -> str:
    """What the score column holds for a head of ``num_labels`` rows."""
    if num_labels == 1:
        return (
            "the score head's raw output at the last token (regression, trained with mean-squared error "
            "towards quality levels 0..3; higher is better; not clamped)"
        )
    return f"softmax probability of class 1 (the positive class) over the score head's {num_labels} rows, in [0, 1]"
