"""What `teach label` will cost before it asks anything: requests, tokens and API cost, with and without
the Batch API. Nothing is sent.

Requests are counted from the teach folder as `label` makes them: one per pair (sampled pairs and their
negatives) and metric; in text mode one description per sampled image first; one rewrite per planned
rewrite sample. Input tokens are the real request texts (the metric prompts with each pair's caption)
at :data:`CHARS_PER_TOKEN` characters a token (``tiktoken``'s count when it is installed), plus the
image's tokens by OpenAI's rule for high-detail images (fit into 2048 x 2048, shorter side to 768,
``base + per_tile x`` 512-pixel tiles), from each image's real size. Output tokens are an assumed reply
length, capped by the request's ``max_tokens`` (the cap is the worst case, also shown). Prices are
USD per million tokens as recorded in :data:`PRICES` (list prices, 2025); the Batch API halves them.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4.0
#: the Batch API's price relative to synchronous requests
BATCH_DISCOUNT = 0.5
#: model -> (USD per 1M input tokens, USD per 1M output tokens), list prices
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}
#: image tokens (base, per 512-px tile) where a model counts them differently from gpt-4o's 85 + 170/tile
IMAGE_TOKENS: dict[str, tuple[int, int]] = {"gpt-4o-mini": (2833, 5667)}
#: assumed reply lengths (tokens): a score line and a rationale, a description, a rewritten caption
ASSUMED_REPLY = {"label": 150, "describe": 300, "rewrite": 80}


@dataclass
class RequestKind:
    kind: str  # label / describe / rewrite
    requests: int
    input_tokens: int
    output_tokens: int  # assumed replies
    output_tokens_max: int  # every reply at max_tokens


@dataclass
class LabelPlan:
    model: str
    kinds: list[RequestKind]
    price: tuple[float, float] | None  # USD per 1M (input, output)
    tokens_from: str
    notes: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(k.requests for k in self.kinds)

    @property
    def input_tokens(self) -> int:
        return sum(k.input_tokens for k in self.kinds)

    @property
    def output_tokens(self) -> int:
        return sum(k.output_tokens for k in self.kinds)

    def cost(self, batch: bool = False, worst: bool = False) -> float | None:
        if self.price is None:
            return None
        output = sum(k.output_tokens_max if worst else k.output_tokens for k in self.kinds)
        usd = (self.input_tokens * self.price[0] + output * self.price[1]) / 1e6
        return usd * (BATCH_DISCOUNT if batch else 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "kinds": [asdict(k) for k in self.kinds],
            "price_per_million": list(self.price) if self.price else None,
            "cost_usd": self.cost(),
            "cost_usd_batch": self.cost(batch=True),
            "cost_usd_worst": self.cost(worst=True),
            "cost_usd_batch_worst": self.cost(batch=True, worst=True),
            "tokens_from": self.tokens_from,
            "notes": self.notes,
        }


def price_of(model: str) -> tuple[float, float] | None:
    name = model.rsplit("/", 1)[-1].lower()
    if name in PRICES:
        return PRICES[name]
    # dated snapshots (gpt-4o-2024-08-06): the longest recorded name it starts with
    matches = [k for k in PRICES if name.startswith(k + "-")]
    return PRICES[max(matches, key=len)] if matches else None


def image_tokens(width: int, height: int, model: str) -> int:
    """OpenAI's count for a high-detail image of this size."""
    base, per_tile = IMAGE_TOKENS.get(model.rsplit("/", 1)[-1].lower(), (85, 170))
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return base + per_tile * math.ceil(width / 512) * math.ceil(height / 512)


def plan_label(folder: Any, options: Any, price: tuple[float, float] | None = None) -> LabelPlan:
    """``folder``: a :class:`~mlmfilter.teach.folder.TeachFolder`; ``options``: its LabelOptions."""
    from mlmfilter.teach.label import TeacherRequests

    count, tokens_from = _token_counter()
    requests = TeacherRequests(options)
    sampled = folder.sampled()
    pairs = folder.pairs()
    sizes = {id(p): _image_size(p.image_bytes) for p in pairs}
    text_mode = options.mode == "text"
    label_in = 0
    notes = []
    unreadable = 0
    for pair in pairs:
        size = sizes[id(pair)]
        for metric in requests.metrics:
            prompt = requests.prompt(metric, pair.caption or "")
            if text_mode:  # the description stands in for the image: an assumed description's length
                label_in += count(options.text_only_template.format(description="", prompt=prompt))
                label_in += ASSUMED_REPLY["describe"]
            else:
                label_in += count(prompt)
                if size is None:
                    unreadable += 1
                else:
                    label_in += image_tokens(*size, options.model)
    n_labels = len(pairs) * len(requests.metrics)
    kinds = [
        RequestKind(
            "label",
            n_labels,
            label_in,
            n_labels * min(options.max_tokens, ASSUMED_REPLY["label"]),
            n_labels * options.max_tokens,
        )
    ]
    if text_mode:
        describe_in = sum(
            count(options.describe_prompt) + (image_tokens(*sizes[id(p)], options.model) if sizes[id(p)] else 0)
            for p in sampled
        )
        kinds.append(
            RequestKind(
                "describe",
                len(sampled),
                describe_in,
                len(sampled) * min(options.describe_max_tokens, ASSUMED_REPLY["describe"]),
                len(sampled) * options.describe_max_tokens,
            )
        )
    # the teacher rewrites the poor captions (with the pair's image, or its description in text mode)
    rewrites = [r for r in folder.rewrite_rows() or [] if r.get("kind") == "poor_caption"]
    if rewrites:
        from mlmfilter.teach.rewrites import rewrite_prompts

        prompts = rewrite_prompts(options)
        known = [image_tokens(*size, options.model) for size in sizes.values() if size is not None]
        per_image = ASSUMED_REPLY["describe"] if text_mode else (round(sum(known) / len(known)) if known else 0)
        rewrite_in = sum(count(prompts.render_rewrite(str(r.get("caption") or ""))) + per_image for r in rewrites)
        kinds.append(
            RequestKind(
                "rewrite",
                len(rewrites),
                rewrite_in,
                len(rewrites) * min(options.rewrite_max_tokens, ASSUMED_REPLY["rewrite"]),
                len(rewrites) * options.rewrite_max_tokens,
            )
        )
    if unreadable:
        notes.append(f"{unreadable} requests carry an image whose size could not be read: its tokens are not counted")
    price = price or price_of(options.model)
    if price is None:
        notes.append(f"no recorded price for {options.model!r}: pass the prices (USD per 1M input, output tokens)")
    notes.append("answers already in the folder's request cache are free; they are counted here as new")
    return LabelPlan(options.model, kinds, price, tokens_from, notes)


def _token_counter():
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("o200k_base")
        return (lambda text: len(encoding.encode(text))), "tiktoken o200k_base"
    except Exception:  # noqa: BLE001 - not installed, or its encoding file cannot be fetched offline
        return (
            lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)
        ), f"approximate: {CHARS_PER_TOKEN:g} characters a token"


def _image_size(data: bytes | None) -> tuple[int, int] | None:
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: nothing is decoded
            return image.size
    except Exception:  # noqa: BLE001
        return None
