"""Load a CLIP-family dual encoder (CLIP, SigLIP, optionally open_clip) with everything needed to score.

Models are named by Hugging Face hub id or local directory ("openai/clip-vit-base-patch32",
"/models/siglip-base"), or "open_clip:ARCH/PRETRAINED" with the ``open-clip`` extra installed.

Two entry points:

- :func:`inspect_clip` reads only config files (no weights): family, preprocessing, text length.
  The pipeline needs the image size before any model is loaded, and provenance must not cost a load.
- :func:`load_clip` loads weights and tokenizer on top of that, once per worker.

When a model is unavailable and ``allow_random_fallback`` is set, both return a tiny randomly
initialised CLIP (seeded, so every worker builds the same one) and say so loudly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mlmfilter.models.common import (
    ModelUnavailableError,
    check_model_path,
    dtype_name,
    library_versions,
    model_source,
    refuse_pickle_only_folder,
    resolve_device,
    resolve_dtype,
    safe_pretrained_kwargs,
    safe_weights_kwargs,
    unavailable_message,
)
from mlmfilter.models.random_fallback import (
    random_weights_warning,
    seeded,
    stand_in_source,
    train_byte_level_bpe,
    warn_stand_in,
)

log = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_WEIGHTS_WARNING = random_weights_warning()
COSINE_FORMULA = "cos = <e_img, e_txt> / (|e_img| |e_txt|), projected embeddings, normalised and dotted in fp32"

_SUPPORTED_MODEL_TYPES = ("clip", "siglip")
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ClipPreprocessing:
    """How the model's own preprocessor turns a photo into pixels.

    CLIP: resize the shorter side to ``image_size`` (bicubic), center crop ``crop_size``.
    SigLIP: resize to ``image_size`` x ``image_size`` (no crop, aspect ratio not kept).
    """

    image_size: int  # shorter side after resize: what the pipeline decodes to
    crop_size: int  # side of the square the vision tower sees
    center_crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def describe(self) -> dict[str, Any]:
        resize = (
            f"shortest edge to {self.image_size}, {self.resample}"
            if self.center_crop
            else f"to {self.image_size}x{self.image_size} ({self.resample}, aspect ratio not kept)"
        )
        return {
            "image_size": self.image_size,
            "resize": resize,
            "center_crop": self.crop_size if self.center_crop else None,
            "rescale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class ClipSpec:
    """What config files alone say about a model; no weights read."""

    name: str
    family: str  # "clip" | "siglip" | "open_clip"
    architecture: str  # e.g. "CLIPModel"
    preprocessing: ClipPreprocessing
    max_text_length: int
    is_random: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    embedding_dim: int = 0  # size of the projected image and text embeddings (0: not known from config)


@dataclass
class LoadedClip:
    """A ready dual encoder: embed images and captions into the same space."""

    model: Any
    tokenizer: Any
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_text_length: int
    is_random: bool
    provenance: dict[str, Any]
    spec: ClipSpec
    device: torch.device
    dtype: torch.dtype

    @property
    def preprocessing(self) -> ClipPreprocessing:
        return self.spec.preprocessing

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids on the model's device; captions longer than ``max_text_length`` are cut (EOS kept)."""
        captions = list(captions)
        if self.spec.family == "open_clip":
            return {"text": self.tokenizer(captions).to(self.device)}
        if self.spec.family == "siglip":
            # SigLIP was trained on max_length-padded ids without an attention mask (it pools the last
            # position), so feed it exactly that.
            enc = self.tokenizer(
                captions, padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"].to(self.device)}
        enc = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """Projected, unnormalised text embeddings (model dtype)."""
        tokens = self.tokenize(captions)
        if self.spec.family == "open_clip":
            return self.model.encode_text(tokens["text"])
        return self.model.get_text_features(**tokens).pooler_output

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image embeddings for N x 3 x H x W normalised pixels."""
        pixel_values = torch.as_tensor(pixel_values).to(self.device, self.dtype)
        if self.spec.family == "open_clip":
            return self.model.encode_image(pixel_values)
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


# -- inspecting -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def inspect_clip(name_or_path: str, allow_random_fallback: bool = False) -> ClipSpec:
    """Read config files only (cached per process). Raises ModelUnavailableError unless falling back."""
    if name_or_path.startswith(OPEN_CLIP_PREFIX):
        return _inspect_open_clip(name_or_path)
    try:
        check_model_path(name_or_path)
        config = _hf_config(name_or_path)
    except ModelUnavailableError as exc:
        if not allow_random_fallback:
            raise
        warn_stand_in(exc, "CLIP")
        return _random_spec(name_or_path)
    if config.model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} model; the CLIP scorer loads "
            f"{' or '.join(_SUPPORTED_MODEL_TYPES)} dual encoders (or open_clip:ARCH/PRETRAINED)"
        )
    text_config = config.text_config
    return ClipSpec(
        name=name_or_path,
        family=config.model_type,
        architecture=(getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "Model")])[0],
        preprocessing=_hf_preprocessing(name_or_path, config),
        max_text_length=int(text_config.max_position_embeddings),
        source=model_source(name_or_path),
        embedding_dim=_hf_embedding_dim(config),
    )


def _hf_embedding_dim(config) -> int:
    """CLIP projects both towers to ``projection_dim``; SigLIP's image embedding is its vision width."""
    if config.model_type == "siglip":
        return int(config.vision_config.hidden_size)
    return int(config.projection_dim)


def _hf_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, **safe_pretrained_kwargs())
    except OSError as exc:  # transformers' word for "not local, not cached, not downloadable"
        raise ModelUnavailableError(unavailable_message(name_or_path, exc)) from exc


def _hf_preprocessing(name_or_path: str, config) -> ClipPreprocessing:
    """The model's own image processor settings; the architecture's defaults if it ships none."""
    from transformers import AutoImageProcessor

    default_mean, default_std = (
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if config.model_type == "siglip" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    )
    try:
        proc = AutoImageProcessor.from_pretrained(name_or_path, **safe_pretrained_kwargs())
    except OSError:
        side = int(config.vision_config.image_size)
        log.warning(
            "%s has no preprocessor_config.json; using %s defaults (%d px)", name_or_path, config.model_type, side
        )
        crop = config.model_type == "clip"
        return ClipPreprocessing(side, side, crop, default_mean, default_std)
    size, crop_size = proc.size, getattr(proc, "crop_size", None)
    center_crop = bool(getattr(proc, "do_center_crop", False)) and crop_size is not None
    if getattr(size, "shortest_edge", None):
        image_size = int(size.shortest_edge)
    else:  # fixed height x width resize (SigLIP); the pipeline's shorter side then equals height
        if size.height != size.width:
            raise ValueError(f"{name_or_path}: non-square resize {size.height}x{size.width} is not supported")
        image_size = int(size.height)
    crop_side = int(crop_size.height) if center_crop else image_size
    resample = getattr(proc, "resample", 3)
    return ClipPreprocessing(
        image_size=image_size,
        crop_size=crop_side,
        center_crop=center_crop,
        mean=tuple(float(v) for v in (proc.image_mean or default_mean)),
        std=tuple(float(v) for v in (proc.image_std or default_std)),
        resample=_PIL_RESAMPLE_NAMES.get(int(resample), str(resample)),
    )


# -- loading ----------------------------------------------------------------------------------------


def load_clip(
    name_or_path: str, device: str = "cpu", dtype: str = "auto", allow_random_fallback: bool = False
) -> LoadedClip:
    """Load model + tokenizer + preprocessing for scoring, in eval mode on ``device`` in ``dtype``."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    spec = inspect_clip(name_or_path, allow_random_fallback)
    if spec.is_random:
        log.warning(
            "!!! %s: %r is unavailable, loaded a tiny RANDOMLY INITIALISED CLIP in its place. "
            "Every score it gives is meaningless. !!!",
            RANDOM_WEIGHTS_WARNING,
            name_or_path,
        )
        model, tokenizer = _random_clip()
    elif spec.family == "open_clip":
        model, tokenizer = _load_open_clip(spec)
    else:
        model, tokenizer = _load_hf(spec, torch_dtype)
    model = model.to(torch_device, torch_dtype).eval()
    max_text_length = spec.max_text_length
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < max_text_length:
        max_text_length = tokenizer_limit
    pre = spec.preprocessing
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        image_size=pre.image_size,
        image_mean=pre.mean,
        image_std=pre.std,
        max_text_length=max_text_length,
        is_random=spec.is_random,
        provenance=clip_provenance(spec, torch_device, torch_dtype, max_text_length),
        spec=spec,
        device=torch_device,
        dtype=torch_dtype,
    )


def _load_hf(spec: ClipSpec, dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    refuse_pickle_only_folder(spec.name)
    model = AutoModel.from_pretrained(spec.name, **safe_weights_kwargs(dtype=dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.name, **safe_pretrained_kwargs())
    except (ImportError, ValueError) as exc:  # e.g. SigLIP's sentencepiece tokenizer without sentencepiece
        raise RuntimeError(
            f"cannot load the tokenizer of {spec.name!r}: {exc} "
            "(SigLIP checkpoints without tokenizer.json need `pip install sentencepiece`)"
        ) from exc
    return model, tokenizer


def clip_provenance(
    spec: ClipSpec, device: torch.device, dtype: torch.dtype, max_text_length: int | None = None
) -> dict[str, Any]:
    """What a reader of the scores needs to reproduce them; cheap (no weights)."""
    text_length = max_text_length or spec.max_text_length
    padding = "max_length, no attention mask" if spec.family == "siglip" else "longest, with attention mask"
    prov: dict[str, Any] = {
        **spec.source,
        "family": spec.family,
        "architecture": spec.architecture,
        "dtype": dtype_name(dtype),
        "device": str(device),
        "preprocessing": spec.preprocessing.describe(),
        "text": {
            "max_length": text_length,
            "truncation": f"tokens beyond {text_length} dropped, EOS kept",
            "padding": padding,
        },
        "libraries": library_versions(),
        "formula": COSINE_FORMULA,
    }
    if spec.is_random:  # "warnings" is the key the run folder collects into its own warnings
        prov["warnings"] = [RANDOM_WEIGHTS_WARNING]
    return prov


# -- random fallback --------------------------------------------------------------------------------

# Caption-like text to train the fallback tokenizer on: it only has to split English into tokens.
_FALLBACK_CORPUS = (
    "a photo of a dog running on the grass",
    "two children are playing with a ball in the park",
    "a man in a red shirt is riding a bicycle down the street",
    "a woman sitting on a bench near the water at sunset",
    "a group of people standing in front of a building",
    "the black and white cat sleeps on the sofa",
    "a close up picture of food on a plate, with vegetables and rice",
    "an aerial view of the city at night with lights",
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_RANDOM_IMAGE_SIZE = 224
_RANDOM_TEXT_LENGTH = 77
_RANDOM_PROJECTION_DIM = 64


def _random_spec(name_or_path: str) -> ClipSpec:
    return ClipSpec(
        name=name_or_path,
        family="clip",
        architecture="CLIPModel",
        preprocessing=ClipPreprocessing(
            _RANDOM_IMAGE_SIZE, _RANDOM_IMAGE_SIZE, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"
        ),
        max_text_length=_RANDOM_TEXT_LENGTH,
        is_random=True,
        source=stand_in_source(name_or_path),
        embedding_dim=_RANDOM_PROJECTION_DIM,
    )


def _random_tokenizer():
    """A lower-casing byte-level BPE trained here on a few sentences, wrapped as CLIP's tokenizer is."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = train_byte_level_bpe(_FALLBACK_CORPUS, 600, [_BOS, _EOS], lowercase=True)
    bos_id, eos_id = bpe.token_to_id(_BOS), bpe.token_to_id(_EOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A {_EOS}", special_tokens=[(_BOS, bos_id), (_EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=_BOS, eos_token=_EOS, pad_token=_EOS, model_max_length=_RANDOM_TEXT_LENGTH
    )


def _random_clip():
    """A tiny CLIPModel (real architecture, small dims), identical in every process."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _random_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=_RANDOM_TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # CLIP pools at the first EOS
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_RANDOM_IMAGE_SIZE,
            patch_size=32,
        ),
        projection_dim=_RANDOM_PROJECTION_DIM,
    )
    with seeded():
        model = CLIPModel(config)
    return model, tokenizer


# -- open_clip (optional extra) ---------------------------------------------------------------------


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(
            f"open_clip models need the optional extra: pip install 'mlmfilter[open-clip]' "
            f"(open_clip_torch, which also needs torchvision). Import failed with: {exc}"
        ) from exc
    return open_clip


def _split_open_clip_name(name: str) -> tuple[str, str | None]:
    """ "open_clip:ViT-B-32/laion2b_s34b_b79k" -> ("ViT-B-32", "laion2b_s34b_b79k"); hf-hub: names stay whole."""
    spec = name[len(OPEN_CLIP_PREFIX) :]
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, _, pretrained = spec.partition("/")
    return arch, pretrained or None


def _inspect_open_clip(name: str) -> ClipSpec:
    open_clip = _import_open_clip()
    arch, pretrained = _split_open_clip_name(name)
    model_cfg = open_clip.get_model_config(arch) or {}
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    side = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    side = int(side[0] if isinstance(side, (list, tuple)) else side)
    resize_mode = pretrained_cfg.get("resize_mode", "shortest")
    return ClipSpec(
        name=name,
        family="open_clip",
        architecture=f"open_clip {arch}",
        preprocessing=ClipPreprocessing(
            image_size=side,
            crop_size=side,
            center_crop=resize_mode == "shortest",
            mean=tuple(pretrained_cfg.get("mean") or OPENAI_CLIP_MEAN),
            std=tuple(pretrained_cfg.get("std") or OPENAI_CLIP_STD),
            resample=pretrained_cfg.get("interpolation", "bicubic"),
        ),
        max_text_length=int(model_cfg.get("text_cfg", {}).get("context_length", 77)),
        source={"model": name, "open_clip_arch": arch, "open_clip_pretrained": pretrained},
        embedding_dim=int(model_cfg.get("embed_dim", 0)),
    )


def _load_open_clip(spec: ClipSpec):
    open_clip = _import_open_clip()
    arch, pretrained = _split_open_clip_name(spec.name)
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    return model, open_clip.get_tokenizer(arch)
