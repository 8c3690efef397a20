"""The released MLM-Filter judges and AITQE: how each one must be asked, read off its own config.

Every released checkpoint was fine-tuned on one request format. This registry records, per
checkpoint, the prompt template version, conversation format, answer prefix (the forced space token
of the scoring scripts), the number of new tokens the released script generates, the image
preprocessing and the dtype -- twice:

- ``trained``: how the model saw its training data (what scores best reflects the model);
- ``released-script``: what the released scoring script actually sends, where that differs from
  training (the 13B names fall back to ``llava_v0``; the v2 script's default ``--conv-mode
  qwen_instruct`` and template v2 for every model; no pad-to-square; fp16), so that published score
  dumps can be matched. Sources: ``../shared/reference/released_judges.md`` sections 1.2, 1.6, 2.

A checkpoint is identified from its ``config.json`` (projector type, vision feature width, the
language model's family from its architecture and special-token ids), never from substrings of its
name. A converted folder carries the original fields it was identified by under
``mlmfilter_source`` (written by the converters), so it is identified the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

log = logging.getLogger(__name__)

Compatibility = Literal["trained", "released-script"]
COMPATIBILITY: tuple[str, ...] = ("trained", "released-script")
#: config.json key under which converters keep the original checkpoint's identifying fields
SOURCE_KEY = "mlmfilter_source"
#: the original config fields identification reads (converters copy exactly these)
IDENTIFYING_FIELDS = (
    "model_type",
    "architectures",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_tower",
    "mm_vision_select_layer",
    "mm_num_image_tokens",
    "image_aspect_ratio",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "hidden_size",
    "num_hidden_layers",
    "image_tile_tokens",
    "visual_hidden_dim",
    "vision_model_name_or_path",
)

_SIGLIP_SO400M_WIDTH = 1152
_LLAMA3_SPECIAL_IDS = {128000, 128001, 128009}


@dataclass(frozen=True)
class RequestSettings:
    """Everything about one request that changes a judge's scores."""

    template: str  # "v1" / "v2" (MLM-Filter prompt wording) or "aitqe"
    conversation: str  # a name in mlmfilter.judge.conversations.FORMATS
    answer_prefix: str  # " ": the forced space token after the assistant cue (29871 / 220)
    max_new_tokens: int  # what the released script generates
    pad_to_square: bool  # expand to a mean-colour square before the image processor
    dtype: str  # "bf16" / "fp16"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReleasedJudge:
    key: str
    hub_ids: tuple[str, ...]
    llm: str
    vision: str
    image_tokens: int
    trained: RequestSettings
    released_script: RequestSettings
    script: str  # the released scoring script the `released-script` settings reproduce
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: the hub id of the vision tower it runs (what `--model <hub id>` downloads when config.json
    #: names a path of the author's machine instead of a hub id)
    vision_tower: str = ""

    def settings(self, compatibility: Compatibility = "trained") -> RequestSettings:
        if compatibility not in COMPATIBILITY:
            raise ValueError(f"compatibility must be one of {', '.join(COMPATIBILITY)}, got {compatibility!r}")
        return self.trained if compatibility == "trained" else self.released_script

    def describe(self, compatibility: Compatibility = "trained") -> dict[str, Any]:
        """Provenance: what the checkpoint is and the settings chosen for it."""
        return {
            "released_judge": self.key,
            "hub_ids": list(self.hub_ids),
            "llm": self.llm,
            "vision": self.vision,
            "image_tokens": self.image_tokens,
            "compatibility": compatibility,
            "settings": self.settings(compatibility).as_dict(),
            "trained_settings": self.trained.as_dict(),
            "released_script": self.script,
            "notes": list(self.notes),
        }


_VICUNA_TRAINED = RequestSettings("v1", "vicuna_v1", " ", 2, True, "bf16")
_LLAMA3_TRAINED = RequestSettings("v1", "llama3", " ", 1, True, "bf16")

REGISTRY: dict[str, ReleasedJudge] = {
    "mlm-filter-llava-13b": ReleasedJudge(
        key="mlm-filter-llava-13b",
        hub_ids=("weizhiwang/mlm-filter-llava-13b-gpt4v", "weizhiwang/mlm-filter-llava-13b-gpt4"),
        llm="Vicuna-13B-v1.5 (Llama-2 vocabulary)",
        vision="CLIP ViT-L/14-336, layer -2, mlp2x_gelu",
        image_tokens=576,
        trained=_VICUNA_TRAINED,
        released_script=replace(_VICUNA_TRAINED, conversation="llava_v0", pad_to_square=False, dtype="fp16"),
        script="MLM_Filter mlm_filter_scoring_datacomp_batch_inference.py (HF names contain no 'v1': llava_v0)",
        notes=("trained with --version v1 (conv_vicuna_v1) and image_aspect_ratio pad",),
        vision_tower="openai/clip-vit-large-patch14-336",
    ),
    "mlm-filter-llama-3-8b": ReleasedJudge(
        key="mlm-filter-llama-3-8b",
        hub_ids=("weizhiwang/mlm-filter-llava-llama-3-8b-gpt4v", "weizhiwang/mlm-filter-llama-3-8b"),
        llm="Llama-3-8B",
        vision="CLIP ViT-L/14-336, mlp2x_gelu (LLaVA-Unified llava_llama)",
        image_tokens=576,
        trained=_LLAMA3_TRAINED,
        released_script=replace(
            _LLAMA3_TRAINED, template="v2", conversation="qwen_instruct", pad_to_square=False, dtype="fp16"
        ),
        script="MLM_Filter mlm_filter_scoring_datacomp_batch_inference_v2.py at HEAD (default --conv-mode qwen_instruct)",
        notes=("Llama-3 writes up to 3 digits as one token: the script generates 1 token",),
        vision_tower="openai/clip-vit-large-patch14-336",
    ),
    "mlm-filter-llama-3.2-3b": ReleasedJudge(
        key="mlm-filter-llama-3.2-3b",
        hub_ids=("weizhiwang/mlm-filter-llama-3.2-3b",),
        llm="Llama-3.2-3B",
        vision="SigLIP so400m-patch14-384 (projector from config.json; the author's pretraining uses aapool_mlp)",
        image_tokens=144,
        trained=_LLAMA3_TRAINED,
        released_script=replace(
            _LLAMA3_TRAINED, template="v2", conversation="qwen_instruct", pad_to_square=False, dtype="fp16"
        ),
        script="MLM_Filter mlm_filter_scoring_datacomp_batch_inference_v2.py at HEAD (default --conv-mode qwen_instruct)",
        notes=("its template (v1 or v2) is not documented: override `template` to try the other one",),
        vision_tower="google/siglip-so400m-patch14-384",
    ),
    "mlm-filter-qwen2.5-1.5b": ReleasedJudge(
        key="mlm-filter-qwen2.5-1.5b",
        hub_ids=("weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o",),
        llm="Qwen2.5-1.5B-Instruct",
        vision="SigLIP so400m-patch14-384, layer -1, aapool_mlp (27x27 -> 12x12)",
        image_tokens=144,
        trained=RequestSettings("v2", "qwen_instruct_train", " ", 2, True, "bf16"),
        released_script=RequestSettings("v2", "qwen_instruct", " ", 2, False, "fp16"),
        script="MLM_Filter mlm_filter_scoring_datacomp_batch_inference_v2.py",
        notes=(
            "training put an added <s> before every sequence; the script does not",
            "the head scores over the tokenizer's 151665 rows (LLaVA-Unified resizes the embeddings)",
        ),
        vision_tower="google/siglip-so400m-patch14-384",
    ),
    "aitqe": ReleasedJudge(
        key="aitqe",
        hub_ids=("HymanH/AITQE",),
        llm="Qwen2-7B (base)",
        vision="SigLIP so400m-patch14-384, layer -2, Linear-GELU-Linear(bias=False)",
        image_tokens=729,
        trained=RequestSettings("aitqe", "aitqe", "", 384, False, "bf16"),
        released_script=RequestSettings("aitqe", "aitqe", "", 384, False, "bf16"),
        script="AITQE inference.py",
        notes=("greedy, up to 384 new tokens, optional early stop at <Overall>",),
        vision_tower="google/siglip-so400m-patch14-384",
    ),
}


def judge_of_hub_id(repo_id: str) -> ReleasedJudge | None:
    """The released judge published under ``repo_id`` (case-insensitive, as the hub resolves ids), or None."""
    wanted = repo_id.lower()
    return next((j for j in REGISTRY.values() if any(h.lower() == wanted for h in j.hub_ids)), None)


def _is_llama3(config: Mapping[str, Any]) -> bool:
    ids: set[Any] = set()
    for value in (config.get("bos_token_id"), config.get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [value])
    return int(config.get("vocab_size") or 0) >= 128000 or bool(ids & _LLAMA3_SPECIAL_IDS)


def _architecture(config: Mapping[str, Any]) -> str:
    return " ".join([str(config.get("model_type") or ""), *map(str, config.get("architectures") or [])])


def identify(config: Mapping[str, Any]) -> ReleasedJudge | None:
    """The released judge a config.json (original or converted) belongs to, or None."""
    source = config.get(SOURCE_KEY)
    if isinstance(source, Mapping):
        config = source
    arch = _architecture(config)
    if config.get("model_type") == "mm" and "image_tile_tokens" in config and "vision_model_name_or_path" in config:
        return REGISTRY["aitqe"]
    if "mm_projector_type" not in config and "mm_vision_tower" not in config:
        return None
    projector = config.get("mm_projector_type", "linear")
    siglip = (
        int(config.get("mm_hidden_size") or 0) == _SIGLIP_SO400M_WIDTH
        or "siglip" in str(config.get("mm_vision_tower", "")).lower()
    )
    if "Qwen" in arch or "qwen" in arch:
        return REGISTRY["mlm-filter-qwen2.5-1.5b"] if projector == "aapool_mlp" else None
    if "llava_llama" in arch or "LlavaLlama" in arch:
        if _is_llama3(config):
            return REGISTRY["mlm-filter-llama-3.2-3b" if siglip else "mlm-filter-llama-3-8b"]
        return REGISTRY["mlm-filter-llava-13b"] if projector == "mlp2x_gelu" and not siglip else None
    return None


def identifying_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a converter copies into the converted config under ``mlmfilter_source``."""
    return {k: config[k] for k in IDENTIFYING_FIELDS if k in config}


def read_config(name_or_path: str) -> dict[str, Any] | None:
    """config.json of a local folder or a cached/downloadable hub model, as a dict (None if unreadable)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    try:
        from transformers import PretrainedConfig

        return PretrainedConfig.get_config_dict(name_or_path)[0]
    except Exception:  # noqa: BLE001 - offline, unknown repo, a random-fallback name: not a released judge
        return None


@dataclass
class ResolvedSettings:
    """The settings a scorer uses, where they came from, and warnings about overrides."""

    settings: RequestSettings
    judge: ReleasedJudge | None
    compatibility: Compatibility
    warnings: list[str]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compatibility": self.compatibility, "settings": self.settings.as_dict()}
        if self.judge is not None:
            out.update(self.judge.describe(self.compatibility))
            out["settings"] = self.settings.as_dict()
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


def resolve_settings(
    judge: ReleasedJudge | None,
    compatibility: Compatibility,
    overrides: Mapping[str, Any],
    defaults: RequestSettings,
) -> ResolvedSettings:
    """The registry's settings for ``judge`` (or ``defaults`` for an unknown model), with the user's
    non-None ``overrides`` applied; each override that differs from how the model was trained warns."""
    base = judge.settings(compatibility) if judge is not None else defaults
    given = {k: v for k, v in overrides.items() if v is not None and k in RequestSettings.__dataclass_fields__}
    settings = replace(base, **given)
    warnings: list[str] = []
    if judge is not None:
        trained = judge.trained
        for name in sorted(given):
            if getattr(settings, name) != getattr(trained, name):
                warnings.append(
                    f"{judge.key} was trained with {name}={getattr(trained, name)!r}; "
                    f"scoring with {name}={getattr(settings, name)!r}"
                )
    for warning in warnings:
        log.warning(warning)
    return ResolvedSettings(settings, judge, compatibility, warnings)


#: MLM scorer option -> request setting it takes from the registry when the user left it unset
_OPTION_SETTINGS = {"template": "template", "conversation": "conversation", "answer_prefix": "answer_prefix"}


def apply_released_settings(options):
    """A released judge's request format for the MLM scorer's options the user left unset.

    ``options.checkpoint_settings``: "trained" (default), "released-script" or "off". Options the user
    set keep their value (with a warning when it differs from how the model was trained). In
    "released-script" mode ``max_new_tokens`` follows the script too. Returns (options, ResolvedSettings
    or None when the model is not a released judge or the setting is "off").
    """
    mode = getattr(options, "checkpoint_settings", "off")
    if mode == "off":
        return options, None
    config = read_config(options.model)
    judge = identify(config) if config else None
    if judge is None or judge.key == "aitqe":
        return options, None
    explicit = {k: getattr(options, k) for k in _OPTION_SETTINGS if k in options.model_fields_set}
    resolved = resolve_settings(judge, mode, explicit, judge.trained)
    updates = {k: getattr(resolved.settings, v) for k, v in _OPTION_SETTINGS.items() if k not in explicit}
    if mode == "released-script" and "max_new_tokens" not in options.model_fields_set:
        updates["max_new_tokens"] = resolved.settings.max_new_tokens
    return options.model_copy(update=updates), resolved
