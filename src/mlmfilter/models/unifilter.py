"""UniFilter's released classifiers, loaded straight from the layout their training code saves (no conversion).

A checkpoint (``weizhiwang/UniFilter-Qwen2.5-1.5B``, ``weizhiwang/UniFilter-Qwen3-0.6B``; Victorwz/UniFilter
``llava_qwen.py`` / ``llava_qwen3.py`` ``Llava*Classifier``, ``llava_arch.py``, ``siglip_encoder.py``,
``multimodal_projector/builder.py``) is a folder holding:

* ``config.json``: the language model's own fields (Qwen2 or Qwen3) plus LLaVA's ``mm_*`` fields
  (``mm_vision_tower``, ``mm_vision_select_layer``, ``mm_projector_type`` -- ``aapool_mlp`` --,
  ``mm_num_image_tokens``, ``image_aspect_ratio``, ``tokenizer_model_max_length``) and ``num_labels``;
* weights: the language model without an LM head (``model.embed_tokens``, ``model.layers.N``,
  ``model.norm``), the projector (``model.mm_projector.mlp_projector.{0,2}``: average-pool the
  patch grid to ``mm_num_image_tokens`` positions, then Linear-GELU-Linear), the score head
  (``score.weight``, ``num_labels`` x hidden, no bias) and a copy of the vision tower under
  ``model.vision_tower.`` that the original never reads: it builds the tower with ``delay_load`` and
  loads it from the hub id ``mm_vision_tower`` names. This loader does the same;
* the tokenizer its training code saved (Qwen's, with ``<s>`` added as BOS).

The vision features are ``hidden_states[mm_vision_select_layer]`` of that SigLIP tower: the output of
that encoder layer, before the post-layernorm (and the pooling head, never used), so only the
embeddings and the encoder layers up to it are kept. Every file comes from a local folder or through
the Hugging Face cache (a download unless ``HF_HUB_OFFLINE`` is set: then the cache alone).

:func:`inspect_unifilter` reads config files only (what provenance and the decoder need before any
weights); :func:`load_unifilter` builds the model. What the classifier is shown and how its output
reads is :mod:`mlmfilter.judge.unifilter`.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlmfilter.core.errors import ModelUnavailableError
from mlmfilter.models.common import (
    check_model_path,
    dtype_name,
    library_versions,
    model_source,
    resolve_device,
    resolve_dtype,
    safe_pretrained_kwargs,
    safe_weights_kwargs,
    unavailable_message,
)

log = logging.getLogger(__name__)

#: the files of a checkpoint fetched from the hub (weights: safetensors; .bin shards only where there are none)
_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
#: config.json fields of LLaVA's wrapper and the classifier, not of the language model
_WRAPPER_FIELDS = re.compile(
    r"^(mm_|tune_mm|freeze_mm|use_mm|image_|tokenizer_|unfreeze_mm|s2$|architectures$|model_type$|_name_or_path$|"
    r"torch_dtype$|dtype$)"
)
_SKIPPED = re.compile(r"(^model\.vision_tower\.|^model\.image_newline$|\.rotary_emb\.inv_freq$|^lm_head\.)")
#: SigLIP's image processor when a tower ships none: square resize, bicubic, mean/std 0.5
_SIGLIP_DEFAULTS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}


# -- what config files say ------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelSettings:
    """The tower's image processor (SigLIP: every image squashed to ``side`` x ``side``)."""

    side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int  # PIL resampling filter
    source: str  # "preprocessor_config.json" (the tower's), or "SigLIP defaults" (it has none)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.side,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": self.resample,
            "settings_from": self.source,
        }


@dataclass(frozen=True)
class UniFilterSpec:
    """A checkpoint as its config files describe it (no weights read)."""

    name: str
    revision: str | None
    config: dict[str, Any] = field(repr=False)
    family: str  # "qwen2" / "qwen3"
    architecture: str
    tower_name: str
    tower_config: Any = field(repr=False)
    pixels: PixelSettings
    source: dict[str, Any]
    tower_source: dict[str, Any]

    @property
    def num_labels(self) -> int:
        if "num_labels" in self.config:
            return int(self.config["num_labels"])
        return len(self.config.get("id2label") or {0: 0, 1: 1})  # transformers' default: 2

    @property
    def projector_type(self) -> str:
        return str(self.config.get("mm_projector_type", "linear"))

    @property
    def image_tokens(self) -> int | None:
        return int(self.config.get("mm_num_image_tokens", 256)) if self.projector_type == "aapool_mlp" else None

    @property
    def select_layer(self) -> int:
        return int(self.config.get("mm_vision_select_layer", -1))

    @property
    def trained_pad_to_square(self) -> bool:
        return self.config.get("image_aspect_ratio", "square") == "pad"

    @property
    def max_positions(self) -> int | None:
        value = self.config.get("tokenizer_model_max_length")
        return int(value) if value else None


def _family(config: dict[str, Any]) -> str:
    arch = " ".join([str(config.get("model_type", "")), *map(str, config.get("architectures") or [])]).lower()
    if "qwen3" in arch:
        return "qwen3"
    if "qwen" in arch:
        return "qwen2"
    raise ValueError(
        f"model_type {config.get('model_type')!r} / architectures {config.get('architectures')} is not a UniFilter "
        "classifier on Qwen2 or Qwen3 (the released UniFilter checkpoints)"
    )


def _check_layout(name: str, config: dict[str, Any]) -> None:
    if "mm_vision_tower" not in config:
        raise ValueError(
            f"{name}: config.json has no mm_vision_tower: not a UniFilter checkpoint in its original layout"
        )
    arch = " ".join(map(str, config.get("architectures") or []))
    if "Classifier" not in arch and "num_labels" not in config and "id2label" not in config:
        raise ValueError(
            f"{name}: {arch or 'this model'} is a LLaVA generator, not a UniFilter classifier (no score head); "
            "an MLM-Filter judge is scored with --scorer mlm"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "aapool_mlp" and projector != "linear" and not re.match(r"^mlp(\d+)x_gelu$", projector):
        raise ValueError(f"{name}: mm_projector_type {projector!r} is not supported (aapool_mlp, mlpNx_gelu, linear)")
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{name}: mm_use_im_start_end is set; UniFilter's classifiers use no image start/end tokens")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"{name}: only mm_vision_select_feature 'patch' is supported")
    if "naflex" in str(config["mm_vision_tower"]).lower():
        raise ValueError(f"{name}: a NaFlex SigLIP-2 tower (variable resolution) is not supported")


def _fetch(name: str, filename: str, revision: str | None) -> Path:
    """``filename`` of a local folder, or of a hub repo through the Hugging Face cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {filename}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name, filename, revision=revision))


def _hub_source(name: str, revision: str | None, config_file: Path) -> dict[str, Any]:
    """Where the checkpoint came from: a local folder, or a hub repo, its revision and the commit it resolved to."""
    if Path(name).expanduser().is_dir():
        return model_source(name)
    return {
        "model": name,
        "hub_id": name,
        "revision": revision or "main",
        "commit": config_file.parent.name,  # <cache>/models--org--name/snapshots/<commit>/config.json
        "cache_path": str(config_file.parent),
    }


def _pixel_settings(tower: str, tower_config: Any) -> PixelSettings:
    """The tower's preprocessor_config.json (its size, mean, std and filter); SigLIP's defaults without one."""
    side = int(tower_config.image_size)
    try:
        path = _fetch(tower, "preprocessor_config.json", None)
        settings = json.loads(path.read_text(encoding="utf-8"))
        source = "preprocessor_config.json"
    except (OSError, ValueError):
        log.warning("no preprocessor_config.json for the vision tower %s: SigLIP's defaults at %d px", tower, side)
        settings, source = dict(_SIGLIP_DEFAULTS), "SigLIP defaults"
    size = settings.get("size") or {}
    side = int(size.get("height") or size.get("shortest_edge") or side) if isinstance(size, dict) else int(size)
    mean = tuple(float(v) for v in settings.get("image_mean", _SIGLIP_DEFAULTS["image_mean"]))
    std = tuple(float(v) for v in settings.get("image_std", _SIGLIP_DEFAULTS["image_std"]))
    return PixelSettings(side, mean, std, int(settings.get("resample", _SIGLIP_DEFAULTS["resample"])), source)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def inspect_unifilter(name: str, revision: str | None = None, vision_tower: str | None = None) -> UniFilterSpec:
    """Read the checkpoint's config.json and its vision tower's config files (cached per process).

    Raises ModelUnavailableError when a file is neither local nor in the cache nor downloadable,
    ValueError when the folder is not a UniFilter checkpoint in its original layout.
    """
    from transformers import AutoConfig

    check_model_path(name)
    try:
        config_file = _fetch(name, "config.json", revision)
    except FileNotFoundError as exc:
        if Path(name).expanduser().is_dir():
            raise ValueError(f"{name} has no config.json: not a model folder") from exc
        raise ModelUnavailableError(unavailable_message(name, exc)) from exc
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, revision, no access: one clear line
        raise ModelUnavailableError(unavailable_message(name, exc)) from exc
    config = json.loads(config_file.read_text(encoding="utf-8"))
    _check_layout(name, config)
    family = _family(config)
    tower = vision_tower or str(config["mm_vision_tower"])
    try:
        loaded = AutoConfig.from_pretrained(tower, **safe_pretrained_kwargs())
    except OSError as exc:
        raise ModelUnavailableError(
            f"the vision tower of {name}, {tower!r}, cannot be found ({str(exc).splitlines()[0]}). UniFilter loads it "
            "by that name as its original code does: download it once (`hf download "
            f"{tower}`), or pass a local copy with --option unifilter.vision_tower=PATH"
        ) from exc
    tower_config = getattr(loaded, "vision_config", loaded)
    if "siglip" not in str(tower_config.model_type):
        raise ValueError(f"vision tower {tower!r} is a {tower_config.model_type!r}, not SigLIP")
    if int(config.get("mm_hidden_size", tower_config.hidden_size)) != int(tower_config.hidden_size):
        raise ValueError(
            f"{name} expects {config['mm_hidden_size']}-wide vision features but the vision tower {tower!r} is "
            f"{tower_config.hidden_size} wide: wrong vision tower for this checkpoint"
        )
    return UniFilterSpec(
        name=name,
        revision=revision,
        config=config,
        family=family,
        architecture=str((config.get("architectures") or ["LlavaQwenClassifier"])[0]),
        tower_name=tower,
        tower_config=tower_config,
        pixels=_pixel_settings(tower, tower_config),
        source=_hub_source(name, revision, config_file),
        tower_source=model_source(tower),
    )


def unifilter_provenance(spec: UniFilterSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a reader of the scores needs to know about the classifier (from config files)."""
    return {
        "model": {
            **spec.source,
            "layout": "UniFilter (Victorwz/UniFilter Llava*Classifier), loaded as saved",
            "architecture": spec.architecture,
            "language_model": spec.family,
            "num_labels": spec.num_labels,
            "projector": spec.projector_type,
            "image_tokens": spec.image_tokens,
            "vision_select_layer": spec.select_layer,
            "tokenizer_model_max_length": spec.max_positions,
            "trained_image_aspect_ratio": spec.config.get("image_aspect_ratio", "square"),
        },
        "vision_tower": {**spec.tower_source, **spec.pixels.as_dict()},
        "device": str(device),
        "dtype": dtype_name(dtype),
        "libraries": library_versions(),
    }


# -- the model --------------------------------------------------------------------------------------


class VisionFeatures(nn.Module):
    """``hidden_states[select_layer]`` of a SigLIP vision model: its embeddings and encoder layers up to that one."""

    def __init__(self, siglip: nn.Module, select_layer: int):
        super().__init__()
        body = getattr(siglip, "vision_model", siglip)  # transformers 4 nests it; 5 does not
        layers = list(body.encoder.layers)
        keep = select_layer if select_layer >= 0 else len(layers) + 1 + select_layer
        if not 0 <= keep <= len(layers):
            raise ValueError(f"mm_vision_select_layer {select_layer} is outside a {len(layers)}-layer tower")
        self.embeddings = body.embeddings
        self.layers = nn.ModuleList(layers[:keep])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden = layer(hidden, None)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden


class AvgPoolProjector(nn.Module):
    """``aapool_mlp``: (B, h*w, D) patch grid -> AdaptiveAvgPool2d to side x side -> Linear-GELU-Linear."""

    def __init__(self, tokens: int, width: int, hidden: int):
        super().__init__()
        side = math.isqrt(tokens)
        self.sampler = nn.AdaptiveAvgPool2d((side, side))
        self.mlp_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, length, width = features.shape
        grid = math.isqrt(length)
        if grid * grid != length:
            raise ValueError(f"aapool_mlp needs a square patch grid, got {length} patches")
        maps = features.transpose(1, 2).reshape(batch, width, grid, grid)  # b (h w) d -> b d h w
        return self.mlp_projector(self.sampler(maps).flatten(2).transpose(1, 2))


def build_projector(kind: str, tokens: int | None, width: int, hidden: int) -> nn.Module:
    """The projector named by ``mm_projector_type``, its parameters named as the checkpoint names them."""
    if kind == "aapool_mlp":
        return AvgPoolProjector(tokens or 256, width, hidden)
    if kind == "linear":
        return nn.Linear(width, hidden)
    depth = int(re.match(r"^mlp(\d+)x_gelu$", kind).group(1))  # type: ignore[union-attr]
    modules: list[nn.Module] = [nn.Linear(width, hidden)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*modules)


class UniFilterClassifier(nn.Module):
    """Vision features -> projector -> spliced into the text embeddings -> language model -> score head.

    Rows are right-padded and masked, and each row is read at its own last position, so a pair's
    score does not depend on the other pairs of its batch.
    """

    def __init__(
        self, vision: VisionFeatures, projector: nn.Module, backbone: nn.Module, head: nn.Linear, max_positions=None
    ):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.backbone = backbone
        self.head = head
        self.max_positions = max_positions

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, pixel_values: torch.Tensor, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """(B, num_labels) float32 head outputs; ``rows``: (ids before the image, ids after it) per pixel row."""
        features = self.projector(self.vision(pixel_values.to(self.dtype)))
        device = features.device
        flat = [i for before, after in rows for i in (*before, *after)]
        text = self.backbone.get_input_embeddings()(torch.tensor(flat, dtype=torch.long, device=device))
        sequences, start = [], 0
        for n, (before, after) in enumerate(rows):
            middle = start + len(before)
            end = middle + len(after)
            sequence = torch.cat([text[start:middle], features[n], text[middle:end]])
            start = end
            # the original truncates the spliced rows to tokenizer_model_max_length
            sequences.append(sequence[: self.max_positions] if self.max_positions else sequence)
        lengths = torch.tensor([len(s) for s in sequences], device=device)
        inputs = nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # zeros on the right
        mask = (torch.arange(inputs.shape[1], device=device)[None, :] < lengths[:, None]).long()
        hidden = self.backbone(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), lengths - 1]
        return F.linear(last.float(), self.head.weight.float())


def readout(logits: torch.Tensor) -> list[float]:
    """One float per row: the raw output of a one-row head, else the probability of class 1."""
    if logits.shape[-1] == 1:
        return logits[:, 0].tolist()
    return torch.softmax(logits, dim=-1)[:, 1].tolist()


# -- loading ----------------------------------------------------------------------------------------


@dataclass
class LoadedUniFilter:
    spec: UniFilterSpec
    model: UniFilterClassifier
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    folder: Path
    provenance: dict[str, Any]


def checkpoint_folder(name: str, revision: str | None = None) -> Path:
    """The checkpoint's whole folder: a local one as is, a hub repo's snapshot through the cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    log.info("%s: weights and tokenizer from the Hugging Face cache (what it lacks is downloaded)", name)
    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=_FILES))
        if not glob.glob(str(folder / "model*.safetensors")):  # an older save: .bin shards only
            folder = Path(snapshot_download(name, revision=revision, allow_patterns=["pytorch_model*.bin*"]))
        return folder
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no access: one clear line
        raise ModelUnavailableError(unavailable_message(name, exc)) from exc


def _weight_files(folder: Path) -> list[Path]:
    """model*.safetensors; else pytorch_model*.bin (read with ``torch.load(weights_only=True)``)."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(Path(p) for p in glob.glob(str(folder / pattern)))
        if files:
            return files
    raise ValueError(f"{folder} holds no model*.safetensors or pytorch_model*.bin weights")


def _tensors(weight_file: Path):
    if weight_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weight_file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
        return
    try:  # tensors and plain containers only: a pickle that would call anything is refused
        state = torch.load(weight_file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{weight_file} holds more than tensors; refused by torch.load(weights_only=True)") from exc
    yield from state.items()


def _split_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """(language model, projector, score head) tensors, renamed for their modules; the tower copy is skipped."""
    text, projector, head = {}, {}, None
    for weight_file in _weight_files(folder):
        for key, tensor in _tensors(weight_file):
            if _SKIPPED.search(key):
                continue
            if key.startswith("model.mm_projector."):
                projector[key[len("model.mm_projector.") :]] = tensor
            elif key == "score.weight":
                head = tensor
            elif key.startswith("model."):
                text[key[len("model.") :]] = tensor
            else:
                raise ValueError(f"{weight_file}: unexpected tensor {key!r} in a UniFilter checkpoint")
    if head is None:
        raise ValueError(f"{folder} has no score.weight: not a UniFilter classifier (no score head)")
    if not projector:
        raise ValueError(f"{folder} has no model.mm_projector.* weights")
    return text, projector, head


def _text_config(spec: UniFilterSpec):
    from transformers import Qwen2Config, Qwen3Config

    fields = {k: v for k, v in spec.config.items() if not _WRAPPER_FIELDS.match(k)}
    if fields.get("rope_scaling") is None:  # the original sets it to None; newer transformers warn on null
        fields.pop("rope_scaling", None)
    return (Qwen3Config if spec.family == "qwen3" else Qwen2Config).from_dict(fields)


def _backbone(spec: UniFilterSpec, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen2Model, Qwen3Model

    model_class = Qwen3Model if spec.family == "qwen3" else Qwen2Model
    model, info = model_class.from_pretrained(
        None, config=_text_config(spec), state_dict=state, dtype=dtype, output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(
            f"{spec.name}: the language model's weights do not fit its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


def load_unifilter(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    vision_tower: str | None = None,
) -> LoadedUniFilter:
    """The classifier ready to score, on ``device`` in ``dtype`` (auto: bf16 on a GPU, fp32 on most CPUs)."""
    from transformers import AutoTokenizer, SiglipVisionModel

    spec = inspect_unifilter(name, revision, vision_tower)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = checkpoint_folder(name, spec.source.get("commit") if spec.source.get("hub_id") else None)
    text_state, projector_state, head_state = _split_weights(folder)
    hidden = int(head_state.shape[1])

    try:
        siglip = SiglipVisionModel.from_pretrained(spec.tower_name, dtype=torch_dtype, **safe_weights_kwargs())
    except OSError as exc:  # config found, weights not (offline, or a pickle-only tower)
        raise ModelUnavailableError(unavailable_message(spec.tower_name, exc)) from exc
    vision = VisionFeatures(siglip, spec.select_layer)
    projector = build_projector(spec.projector_type, spec.image_tokens, int(spec.tower_config.hidden_size), hidden)
    try:
        projector.load_state_dict(projector_state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{name}: the projector weights do not fit {spec.projector_type}: {exc}") from exc
    head = nn.Linear(hidden, int(head_state.shape[0]), bias=False)
    head.weight.data.copy_(head_state)
    if head_state.shape[0] != spec.num_labels:
        raise ValueError(f"{name}: score.weight has {head_state.shape[0]} rows, config.json says {spec.num_labels}")
    model = UniFilterClassifier(vision, projector, _backbone(spec, text_state, torch_dtype), head, spec.max_positions)
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **safe_pretrained_kwargs())
    return LoadedUniFilter(
        spec, model, tokenizer, torch_device, torch_dtype, folder, unifilter_provenance(spec, torch_device, torch_dtype)
    )
