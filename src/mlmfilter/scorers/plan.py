"""What a scoring will cost, before it runs: pairs, vision passes, LLM tokens, GPU hours. Nothing is scored.

- **pairs**: counted per shard without reading it (:func:`mlmfilter.io.readers.layout.estimate_rows`:
  parquet footers, img2dataset's ``_stats.json``, local tar headers); shards that cannot be counted so
  (remote, compressed) take the mean of the counted ones, and the total is marked estimated;
- **tokens per pair** of the MLM judge: the first ``sample`` pairs of the inputs are read and their real
  prompts (every metric's, in the judge's request format from the registry or the options) tokenized
  the way the judge reads them, with the judge's own tokenizer: exactly through its processor when the
  model is loadable as it is (a transformers folder, a converted judge, the random stand-in), else with
  the original checkpoint's tokenizer plus the registry's number of image tokens (a released judge not
  converted yet: only its tokenizer files are fetched), else approximated (4 characters a token) and
  said so;
- **work**: vision passes (the transformers backend encodes each image once per pair; backends that
  send one request per metric, once per metric), LLM tokens as the backend processes them (prompt
  prefix shared across metrics, or not) and as the released script's method would (each metric alone);
  model FLOPs per pair (:mod:`mlmfilter.judge.throughput`);
- **hours** on named GPUs: measured figures where the package records one, else FLOPs at an assumed
  share of the card's bf16 peak, marked as such.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.readers.layout import estimate_rows
from mlmfilter.io.sources import ShardSource
from mlmfilter.judge.throughput import Gpu, JudgeCost, TransformerSize, transformer_size

log = logging.getLogger(__name__)

#: characters per token where no tokenizer of the judge can be had (English web captions and prompts)
CHARS_PER_TOKEN = 4.0


@dataclass
class PairCount:
    shards: int
    counted_shards: int
    pairs: int | None  # None: no shard could be counted
    estimated: bool  # some shards took the mean of the counted ones

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_pairs(sources: Sequence[ShardSource]) -> PairCount:
    counts = [estimate_rows(source) for source in sources]
    known = [c for c in counts if c is not None]
    if not known:
        return PairCount(len(sources), 0, None, True)
    mean = sum(known) / len(known)
    total = sum(known) + round(mean * (len(counts) - len(known)))
    return PairCount(len(sources), len(known), int(total), len(known) < len(counts))


@dataclass
class ScorerPlan:
    """One scorer's work per pair and what it costs."""

    scorer: str
    model: str | None = None
    vision_passes: float = 0.0  # per pair
    llm_tokens: float = 0.0  # per pair, as the backend processes them
    llm_tokens_per_metric_pass: float | None = None  # per pair, each metric in its own pass (released script)
    tokens_from: str = ""  # how the tokens were counted
    flops: float | None = None  # model FLOPs per pair
    metrics: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: JudgeCost | None = None

    def to_json(self, pairs: int | None, gpus: Sequence[Gpu]) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "cost"}
        if pairs is not None:
            out["total_vision_passes"] = self.vision_passes * pairs
            out["total_llm_tokens"] = self.llm_tokens * pairs
        if self.cost is not None and pairs is not None:
            out["gpu_hours"] = {}
            for gpu in gpus:
                hours, basis = self.cost.hours(pairs, gpu)
                out["gpu_hours"][gpu.name] = {"hours": hours, "basis": basis}
        return out


@dataclass
class ScorePlan:
    """What :func:`mlmfilter.api.plan` returns."""

    inputs: list[str]
    pairs: PairCount
    sampled_pairs: int
    scorers: list[ScorerPlan]
    gpus: list[Gpu]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "pairs": self.pairs.to_json(),
            "sampled_pairs": self.sampled_pairs,
            "scorers": [s.to_json(self.pairs.pairs, self.gpus) for s in self.scorers],
            "gpus": [asdict(g) for g in self.gpus],
        }


def plan_scoring(
    sources: Sequence[ShardSource],
    scorers: Sequence[Any],  # ScorerSpec
    read_options: ReadOptions,
    gpus: Sequence[Gpu],
    sample: int = 64,
    inputs: Sequence[str] = (),
) -> ScorePlan:
    pairs = count_pairs(sources)
    samples = _first_pairs(sources, read_options, sample)
    plans = [_plan_scorer(spec.name, dict(spec.options), samples) for spec in scorers]
    return ScorePlan(list(inputs), pairs, len(samples), plans, list(gpus))


def _first_pairs(sources: Sequence[ShardSource], read_options: ReadOptions, n: int) -> list[Any]:
    """The first ``n`` readable pairs (caption and image bytes), shard after shard."""
    out: list[Any] = []
    for source in sources:
        for sample in read_shard(source, read_options):
            if sample.ok and (sample.caption or "").strip():
                out.append(sample)
                if len(out) >= n:
                    return out
    return out


def _plan_scorer(name: str, options: dict[str, Any], samples: list[Any]) -> ScorerPlan:
    from mlmfilter.scorers import build_scorer, scorer_class

    if name == "mlm":
        from mlmfilter.scorers.mlm import MLMOptions

        return plan_mlm(MLMOptions(**options), samples)
    cls = scorer_class(name)
    plan = ScorerPlan(name, model=options.get(cls.model_option) if cls.model_option else None)
    if name in ("clip", "ocr", "aitqe"):
        plan.vision_passes = 1.0
    if name == "aitqe":
        opts = cls.Options(**options)
        plan.notes.append(
            f"generates up to {opts.max_new_tokens} tokens per pair (greedy; early stop: {opts.early_stop})"
        )
    if name == "rules":
        build_scorer(name, options)  # validated like a run would
        plan.notes.append("CPU only: caption rules and the decoded image's size")
    return plan


# -- the MLM judge ----------------------------------------------------------------------------------------


@dataclass
class _Judge:
    """What counting needs: a way to get token ids per prompt for a pair, and the model's sizes."""

    encode: Any  # (sample) -> (full ids per prompt, shared prefix length)
    tokens_from: str
    llm: TransformerSize | None
    vision: TransformerSize | None
    patches: int
    judge_key: str | None
    notes: list[str]


def plan_mlm(options: Any, samples: list[Any]) -> ScorerPlan:
    from mlmfilter.backends import backend_info
    from mlmfilter.judge.prompts import resolve_metrics, resolve_template, short_name
    from mlmfilter.judge.registry import apply_released_settings
    from mlmfilter.judge.trained_format import apply_recorded_format

    requested = options.model
    model_folder = _loadable_folder(requested)
    info = backend_info(options.backend)
    released = None
    if info.runs_in_process or model_folder is not None:
        probe = options.model_copy(update={"model": model_folder}) if model_folder else options
        probe = apply_recorded_format(probe)
        probe, released = apply_released_settings(probe)
        options = probe.model_copy(update={"model": requested})
    metrics = resolve_metrics(options.metrics)
    template = resolve_template(options.template)
    judge = _judge(options, model_folder, released, template, metrics)
    plan = ScorerPlan("mlm", model=requested, metrics=[short_name(m) for m in metrics], tokens_from=judge.tokens_from)
    plan.notes.extend(judge.notes)
    if released is not None:
        plan.notes.append(f"asked as {released.judge.key} was trained: {released.settings.as_dict()}")
    full_lengths, shared_lengths, prefix_lengths = [], [], []
    for sample in samples:
        try:
            full, prefix = judge.encode(sample)
        except Exception as exc:  # noqa: BLE001 - a pair the judge would refuse: not counted, said once
            if not any(n.startswith("some sampled pairs") for n in plan.notes):
                plan.notes.append(f"some sampled pairs could not be encoded ({type(exc).__name__}: {exc})")
            continue
        full_lengths.append(sum(len(f) for f in full))
        shared_lengths.append(prefix + sum(len(f) - prefix for f in full))
        prefix_lengths.append(prefix)
    if not full_lengths:
        plan.notes.append("no sampled pair could be encoded: tokens per pair unknown")
        return plan
    per_metric_pass = sum(full_lengths) / len(full_lengths)
    shared = sum(shared_lengths) / len(shared_lengths)
    prefix = sum(prefix_lengths) / len(prefix_lengths)
    shares_prefix = options.backend in ("transformers", "vllm")  # the prefix's KV is computed once per pair
    plan.llm_tokens = shared if shares_prefix else per_metric_pass
    plan.llm_tokens_per_metric_pass = per_metric_pass
    plan.vision_passes = 1.0 if options.backend == "transformers" else float(len(metrics))
    if options.backend == "vllm":
        plan.notes.append("vllm: one request per metric (its prefix and encoder caches may reuse the image)")
    if judge.llm is not None:
        suffix = (shared - prefix) / max(len(metrics), 1)
        llm = (
            judge.llm.flops(prefix, prefix / 2) + len(metrics) * judge.llm.flops(suffix, prefix + suffix / 2)
            if shares_prefix
            else len(metrics) * judge.llm.flops(per_metric_pass / len(metrics), per_metric_pass / len(metrics) / 2)
        )
        vision = plan.vision_passes * judge.vision.flops(judge.patches, judge.patches) if judge.vision else 0.0
        plan.flops = llm + vision
        plan.cost = JudgeCost(plan.vision_passes, plan.llm_tokens, plan.flops, judge.judge_key, len(metrics))
    else:
        plan.notes.append("the model's size is unknown here: no FLOPs or hours")
    return plan


def _loadable_folder(name: str) -> str | None:
    """A folder transformers loads for ``name``: the folder itself, or a released judge's converted cache
    entry (never converted here)."""
    path = Path(name).expanduser()
    from mlmfilter.convert.cache import cached_conversion

    converted = cached_conversion(name)
    if converted is not None:
        return str(converted.path)
    if path.is_dir():
        return str(path)
    return None


def _judge(options: Any, folder: str | None, released: Any, template: Any, metrics: list[str]) -> _Judge:
    from mlmfilter.judge.backend import JudgeRequest
    from mlmfilter.judge.conversations import default_answer_prefix

    answer_prefix = (
        default_answer_prefix(options.conversation) if options.answer_prefix is None else options.answer_prefix
    )
    original = _original_config(options.model) if folder is None else None
    if original is not None:
        return _original_judge(options, original, released, template, metrics, answer_prefix)
    try:
        encoder, spec, config = _processor_encoder(options, folder, answer_prefix)
    except Exception as exc:  # noqa: BLE001 - unavailable here: approximate, and say why
        return _approximate_judge(options, template, metrics, exc)

    def encode(sample):
        from mlmfilter.images.decode import DecodeSpec, decode_sample

        decode_sample(sample, DecodeSpec(shorter_side=spec.image_size))
        if sample.error:
            raise ValueError(sample.error)
        request = JudgeRequest(sample.image, [template.render(m, sample.caption) for m in metrics])
        batch = encoder.encode([request], [0], extra_tokens=0)
        if not batch.items:
            raise ValueError(next(iter(batch.failures.values())).detail)
        item = batch.items[0]
        return item.full, item.prefix_len

    text, vision = _sizes(config)
    patches = _patches(config.get("vision_config") or {})
    source = "the random stand-in's tokenizer and processor" if spec.is_random else f"{options.model}'s processor"
    notes = ["RANDOM stand-in model: its tokenizer and size are not the real judge's"] if spec.is_random else []
    key = released.judge.key if released is not None else None
    return _Judge(encode, f"exact: {source}, real prompts", text, vision, patches, key, notes)


def _processor_encoder(options: Any, folder: str | None, answer_prefix: str):
    from mlmfilter.models.vlm import inspect_vlm
    from mlmfilter.models.vlm_encoding import PromptEncoder

    name = folder or options.model
    spec = inspect_vlm(name, options.allow_random_fallback, options.max_image_pixels)
    if spec.is_random:
        from mlmfilter.models.tiny_vlm import build_tiny_vlm

        model, processor = build_tiny_vlm(spec.family.name)
        config = model.config.to_dict()
    else:
        import json

        from transformers import AutoProcessor

        from mlmfilter.models.common import safe_pretrained_kwargs

        processor = AutoProcessor.from_pretrained(name, **safe_pretrained_kwargs())
        config_file = Path(name) / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name, **safe_pretrained_kwargs()).to_dict()
    encoder = PromptEncoder(processor, spec.family, options.conversation, answer_prefix, spec.pixel_budget, 1 << 30)
    return encoder, spec, config


def _original_judge(options, config, released, template, metrics, answer_prefix) -> _Judge:
    """A released judge not converted yet: its own tokenizer (+ ``<image>``, as the converter adds it) and the
    registry's image tokens; nothing but the tokenizer files is fetched."""
    from types import SimpleNamespace

    from mlmfilter.judge.registry import identify
    from mlmfilter.models.vlm_encoding import PromptEncoder
    from mlmfilter.models.vlm_families import FAMILIES

    judge = released.judge if released is not None else identify(config)
    try:
        tokenizer = _original_tokenizer(options.model)
    except Exception as exc:  # noqa: BLE001
        return _approximate_judge(options, template, metrics, exc)
    from mlmfilter.convert.original import add_image_and_pad_tokens

    add_image_and_pad_tokens(tokenizer)
    family = FAMILIES["llava"]
    conversation = options.conversation if options.conversation != "auto" else "vicuna_v1"
    encoder = PromptEncoder(SimpleNamespace(tokenizer=tokenizer), family, conversation, answer_prefix, None, 1 << 30)
    # the pooled projector's count is in its config; otherwise the registry's (576 for CLIP-L/336's patches)
    pooled = config.get("mm_projector_type") == "aapool_mlp" and config.get("mm_num_image_tokens")
    image_tokens = int(pooled or (judge.image_tokens if judge is not None else 576))

    def encode(sample):
        full = []
        for metric in metrics:
            ids = encoder.token_ids(encoder.prompt_text(template.render(metric, sample.caption)))
            at = ids.index(encoder.image_token_id)
            full.append(ids[:at] + [encoder.image_token_id] * image_tokens + ids[at + 1 :])
        return full, _common_prefix(full)

    tower = config.get("mm_vision_tower") or (judge.vision_tower if judge else None)
    from mlmfilter.judge.throughput import KNOWN_TOWERS

    vision, patches = KNOWN_TOWERS.get(str(tower), (None, 0))
    if judge is not None and judge.vision_tower in KNOWN_TOWERS and vision is None:
        vision, patches = KNOWN_TOWERS[judge.vision_tower]
    return _Judge(
        encode,
        f"exact: {options.model}'s own tokenizer, real prompts, {image_tokens} image tokens",
        transformer_size(config),
        vision,
        patches,
        judge.key if judge is not None else None,
        ["not converted yet: the first run downloads and converts it"],
    )


def _approximate_judge(options, template, metrics, error: Exception) -> _Judge:
    """No tokenizer of the judge here: characters / 4, and for a released judge named by hub id its
    registry figures (image tokens, language model and tower sizes)."""
    from mlmfilter.judge.registry import judge_of_hub_id
    from mlmfilter.judge.throughput import KNOWN_LLMS, KNOWN_TOWERS

    judge = judge_of_hub_id(options.model)
    image_tokens = judge.image_tokens if judge is not None else 576

    def encode(sample):
        texts = [template.render(m, sample.caption) for m in metrics]
        full = [[0] * (image_tokens + math.ceil(len(t) / CHARS_PER_TOKEN)) for t in texts]
        shared = len(texts[0])
        for text in texts[1:]:
            shared = next((i for i, (a, b) in enumerate(zip(texts[0], text)) if a != b), min(shared, len(text)))
        return full, image_tokens + math.floor(shared / CHARS_PER_TOKEN)

    reason = f"{type(error).__name__}: {str(error).split('. ')[0].splitlines()[0]}"
    vision, patches = KNOWN_TOWERS.get(judge.vision_tower, (None, 0)) if judge is not None else (None, 0)
    source = f"{image_tokens} image tokens" + (f" ({judge.key}, registry)" if judge is not None else " (assumed)")
    return _Judge(
        encode,
        f"approximate: {CHARS_PER_TOKEN:g} characters a token, {source}; the judge's tokenizer is not "
        f"available here ({reason})",
        KNOWN_LLMS.get(judge.key) if judge is not None else None,
        vision,
        patches,
        judge.key if judge is not None else None,
        [],
    )


def _original_config(name: str) -> dict[str, Any] | None:
    """config.json of ``name`` when it is an original-layout checkpoint (folder or hub cache / one small file)."""
    from mlmfilter.convert.cache import original_config

    return original_config(name)


def _original_tokenizer(name: str):
    from mlmfilter.convert.cache import original_tokenizer_folder
    from mlmfilter.convert.unified import load_original_tokenizer

    folder = original_tokenizer_folder(name)
    from transformers import PretrainedConfig

    return load_original_tokenizer(folder, PretrainedConfig())


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _sizes(config: dict[str, Any]) -> tuple[TransformerSize | None, TransformerSize | None]:
    text = config.get("text_config") or config
    vision = config.get("vision_config")
    vision_size = transformer_size(vision, gated_mlp=False) if isinstance(vision, dict) else None
    return transformer_size(text), vision_size


def _patches(vision: dict[str, Any]) -> int:
    try:
        patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return patches + (1 if "clip" in str(vision.get("model_type", "")) else 0)
