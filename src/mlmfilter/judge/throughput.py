"""How fast a judge reads pairs on named GPUs: measured figures where they exist, FLOPs estimates elsewhere.

A judge's work per pair is prefill: the vision tower once per image, then the language model over the
prompt tokens (with the image's tokens in them), the score read from the next-token distribution.
Its cost is therefore counted in model FLOPs: ``2 x parameters`` per token through a transformer
(embeddings and the output head excluded: the head runs only at the few answer positions), plus the
attention's ``4 x layers x hidden x context`` per token. Hours on a GPU are those FLOPs divided by
the card's dense bf16 peak times the utilisation the judge reaches there:

- **measured**: a figure in :data:`MEASURED` (pairs/s for a judge on a card, with the command that
  gave it, recorded in ``docs/benchmarks.md``) is used as it is;
- **estimated**: otherwise the FLOPs at :data:`ASSUMED_UTILISATION` of the card's peak.

Torch-free: configs arrive as dicts (``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: the share of a card's dense bf16 peak an estimate assumes the judge reaches (prefill of full
#: token-budget batches; the issue's target on an H100 is about 45%)
ASSUMED_UTILISATION = 0.35


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense (no sparsity), the vendor's datasheet figure
    memory_gb: int


#: named GPUs (datasheet dense bf16 tensor-core peaks; the T4 has no bf16: its fp16 peak)
GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("H200", 989.0, 141),
        Gpu("H100-SXM", 989.0, 80),
        Gpu("H100-PCIe", 756.0, 80),
        Gpu("A100-80GB", 312.0, 80),
        Gpu("L40S", 362.0, 48),
        Gpu("A10G", 125.0, 24),
        Gpu("L4", 121.0, 24),
        Gpu("RTX-4090", 165.0, 24),
        Gpu("T4", 65.0, 16),
    )
}
DEFAULT_GPUS = ("H100-SXM", "A100-80GB", "L4")


@dataclass(frozen=True)
class Measurement:
    """A judge timed on a card: pairs per second for a number of metrics (``benchmarks/``)."""

    judge: str  # registry key, e.g. mlm-filter-qwen2.5-1.5b
    gpu: str  # a key of GPUS
    metrics: int
    pairs_per_s: float
    source: str  # the benchmark command and where its output is recorded


#: judges timed on GPUs (none yet: add a line with the benchmark that measured it, and its docs entry)
MEASURED: list[Measurement] = []


def measured(judge: str | None, gpu: str, metrics: int) -> Measurement | None:
    if judge is None:
        return None
    return next((m for m in MEASURED if m.judge == judge and m.gpu == gpu and m.metrics == metrics), None)


def resolve_gpus(names: str | list[str] | tuple[str, ...] | None) -> list[Gpu]:
    """``"H100-SXM,L4"`` or names -> the GPUs (case-insensitive); ValueError naming the known ones."""
    if names is None:
        names = list(DEFAULT_GPUS)
    elif isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n]
    by_lower = {k.lower(): v for k, v in GPUS.items()}
    out = []
    for name in names:
        gpu = by_lower.get(name.lower()) or by_lower.get(name.lower().replace("_", "-"))
        if gpu is None:
            raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
        out.append(gpu)
    return out


# -- model sizes from config.json ---------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerSize:
    """What the FLOPs of one token through a transformer depend on."""

    params: float  # without embeddings and output head
    layers: int
    hidden: int

    def flops(self, tokens: float, context: float) -> float:
        """Forward FLOPs for ``tokens`` tokens attending, on average, to ``context`` positions."""
        return 2.0 * self.params * tokens + 4.0 * self.layers * self.hidden * context * tokens


def transformer_size(config: Mapping[str, Any], gated_mlp: bool = True) -> TransformerSize | None:
    """From a text or vision config dict (hidden_size, intermediate_size, num_hidden_layers, heads)."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        inner = int(config.get("intermediate_size") or 4 * hidden)
        heads = int(config.get("num_attention_heads") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // max(heads, 1))
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = (3 if gated_mlp else 2) * hidden * inner
    return TransformerSize(float(layers * (attention + mlp)), layers, hidden)


def _tower(hidden: int, layers: int, inner: int, heads: int) -> TransformerSize:
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inner,
        "num_attention_heads": heads,
    }
    size = transformer_size(config, gated_mlp=False)
    assert size is not None
    return size


#: released judges' towers (their published configs) when the config is not at hand: (size, positions)
KNOWN_TOWERS: dict[str, tuple[TransformerSize, int]] = {
    "google/siglip-so400m-patch14-384": (_tower(1152, 27, 4304, 16), 729),  # 27 x 27 patches
    "openai/clip-vit-large-patch14-336": (_tower(1024, 24, 4096, 16), 577),  # 24 x 24 patches + CLS
}


@dataclass(frozen=True)
class JudgeCost:
    """Per pair: vision passes, LLM tokens processed, model FLOPs; and what they cost per card."""

    vision_passes: float
    llm_tokens: float
    flops: float
    judge: str | None
    metrics: int

    def hours(self, pairs: float, gpu: Gpu) -> tuple[float, str]:
        """(hours for ``pairs`` on ``gpu``, "measured" or "estimated ...")."""
        figure = measured(self.judge, gpu.name, self.metrics)
        if figure is not None:
            return pairs / figure.pairs_per_s / 3600.0, "measured"
        rate = gpu.bf16_tflops * 1e12 * ASSUMED_UTILISATION / max(self.flops, 1.0)
        return pairs / rate / 3600.0, f"estimated from FLOPs at {ASSUMED_UTILISATION:.0%} of bf16 peak"


def _llm(hidden: int, layers: int, inner: int, heads: int, kv_heads: int) -> TransformerSize:
    size = transformer_size(
        {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": inner,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
        }
    )
    assert size is not None
    return size


#: the released judges' language models (their published configs), for plans made without their files
KNOWN_LLMS: dict[str, TransformerSize] = {
    "mlm-filter-qwen2.5-1.5b": _llm(1536, 28, 8960, 12, 2),  # Qwen2.5-1.5B-Instruct
    "mlm-filter-llama-3.2-3b": _llm(3072, 28, 8192, 24, 8),  # Llama-3.2-3B
    "mlm-filter-llama-3-8b": _llm(4096, 32, 14336, 32, 8),  # Llama-3-8B
    "mlm-filter-llava-13b": _llm(5120, 40, 13824, 40, 40),  # Vicuna-13B-v1.5
    "aitqe": _llm(3584, 28, 18944, 28, 4),  # Qwen2-7B
}
