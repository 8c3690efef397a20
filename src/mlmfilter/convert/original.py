"""What every converter of an original-layout judge shares: reading the folder, writing a checked one.

The released judges are saved by their training code, not by transformers: LLaVA-1.5
(:mod:`mlmfilter.convert.llava`), LLaVA-Unified (:mod:`mlmfilter.convert.unified`) and AITQE
(:mod:`mlmfilter.convert.aitqe`) all keep a raw ``config.json`` with the multimodal wrapper's settings
beside the LLM's, and weight shards as ``model*.safetensors`` or ``pytorch_model*.bin``.
:class:`OriginalLlavaCheckpoint` reads that folder (one shard at a time, ``.bin`` only through
``torch.load(weights_only=True)``); the rest writes the converted folder: the target dtype, grown
embeddings (:class:`EmbeddingResizer`), safetensors shards with their index (:class:`ShardWriter`),
the check that every tensor the new model has was written once with its shape
(:func:`check_complete`), the generation config and the CLIP tower's image settings.
"""

from __future__ import annotations

import glob
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from mlmfilter.judge.conversations import REFERENCE_IMAGE_TOKEN as IMAGE_TOKEN
from mlmfilter.models.common import safe_pretrained_kwargs

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
#: the embedding matrices are padded to a multiple of this (as llava-hf does) for faster matmuls
EMBEDDING_PAD_MULTIPLE = 64

_FEATURE_STRATEGY = {"patch": "default", "cls_patch": "full"}
_WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")


class LlavaConversionError(ValueError):
    """The source folder is not a convertible checkpoint (the message says why)."""


# -- reading the original checkpoint ----------------------------------------------------------------


class OriginalLlavaCheckpoint:
    """A LLaVA-1.5 training-code checkpoint folder: raw config.json, weight shards, tokenizer files."""

    #: config.json fields that belong to LLaVA's multimodal wrapper, not to the Llama text model
    WRAPPER_FIELDS = re.compile(
        r"^(mm_|tune_mm|freeze_mm|use_mm|image_|tokenizer_|unfreeze_mm|s2|architectures$|model_type$|_name_or_path$)"
    )
    #: fields the text config never takes (the dtype is the converter's choice)
    DROPPED_FIELDS: tuple[str, ...] = ("torch_dtype", "dtype")

    def _read_config(self, path: str | Path) -> Path:
        """Sets ``path`` and ``config`` from the folder's config.json; returns that file's path."""
        self.path = Path(path).expanduser()
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise LlavaConversionError(f"{self.path} has no config.json: not a model folder")
        self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        return config_file

    def __init__(self, path: str | Path):
        config_file = self._read_config(path)
        if "mm_vision_tower" not in self.config and "mm_projector_type" not in self.config:
            raise LlavaConversionError(
                f"{config_file} has no mm_vision_tower/mm_projector_type: not an original LLaVA checkpoint "
                f"(a llava-hf folder with model_type 'llava' and a text_config needs no conversion)"
            )
        self.weight_files = self._find_weight_files()

    def _find_weight_files(self) -> list[Path]:
        for pattern in _WEIGHT_PATTERNS:
            files = sorted(Path(p) for p in glob.glob(str(self.path / pattern)))
            if files:
                return files
        raise LlavaConversionError(f"{self.path} holds no model*.safetensors or pytorch_model*.bin weights")

    # -- settings of the multimodal wrapper
    @property
    def projector_type(self) -> str:
        return self.config.get("mm_projector_type", "linear")

    @property
    def vision_select_layer(self) -> int:
        return int(self.config.get("mm_vision_select_layer", -2))

    @property
    def vision_feature_strategy(self) -> str:
        feature = self.config.get("mm_vision_select_feature", "patch")
        try:
            return _FEATURE_STRATEGY[feature]
        except KeyError:
            raise LlavaConversionError(f"mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")

    @property
    def vision_tower_name(self) -> str | None:
        return self.config.get("mm_vision_tower") or self.config.get("vision_tower")

    @property
    def pads_to_square(self) -> bool:
        return self.config.get("image_aspect_ratio", "square") == "pad"

    def check_supported(self) -> None:
        """Refuse the LLaVA variants that LlavaForConditionalGeneration cannot express."""
        if self.projector_type != "mlp2x_gelu":
            raise LlavaConversionError(
                f"mm_projector_type {self.projector_type!r} is not supported: llava-hf's projector is "
                f"Linear-GELU-Linear (LLaVA's mlp2x_gelu)"
            )
        if self.config.get("mm_use_im_start_end") or self.config.get("mm_use_im_patch_token"):
            raise LlavaConversionError(
                "mm_use_im_start_end/mm_use_im_patch_token are not supported: llava-hf has no image "
                "start/end tokens (no released LLaVA-1.5 or MLM-Filter checkpoint sets them)"
            )
        aspect = self.config.get("image_aspect_ratio", "square")
        if aspect not in ("pad", "square", None):
            raise LlavaConversionError(f"image_aspect_ratio {aspect!r} is not supported (pad, square)")

    def text_config_class(self):
        from transformers import LlamaConfig

        return LlamaConfig

    def text_config(self):
        """The LLM's config: config.json without the multimodal wrapper's fields."""
        fields = {k: v for k, v in self.config.items() if not self.WRAPPER_FIELDS.match(k)}
        for key in self.DROPPED_FIELDS:
            fields.pop(key, None)
        if fields.get("rope_scaling") is None:  # old transformers wrote null; newer ones warn on it
            fields.pop("rope_scaling", None)
        return self.text_config_class().from_dict(fields)

    def source_dtype(self) -> torch.dtype:
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        for _, tensor in self.iter_tensors(self.weight_files[0]):
            return tensor.dtype
        return torch.float32

    # -- tensors, one shard at a time
    @staticmethod
    def iter_tensors(weight_file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        if weight_file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weight_file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:  # mmap: a 10 GB .bin shard is not read into memory at once
            try:  # weights_only: tensors and plain containers only; a pickle that would call anything is refused
                state = torch.load(weight_file, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                raise LlavaConversionError(
                    f"{weight_file} holds more than tensors and was refused by torch.load(weights_only=True): {reason}"
                ) from None
            yield from state.items()

    def key_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name and shape (cheap: safetensors headers, mmap'd .bin)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for weight_file in self.weight_files:
            if weight_file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(weight_file), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
            else:
                for key, tensor in self.iter_tensors(weight_file):
                    shapes[key] = tuple(tensor.shape)
        return shapes


def resolve_target_dtype(dtype: str, checkpoint: OriginalLlavaCheckpoint) -> torch.dtype:
    """``auto`` keeps the checkpoint's dtype; any other name as :func:`~mlmfilter.models.common.resolve_dtype`."""
    if (dtype or "auto").strip().lower() == "auto":
        return checkpoint.source_dtype()
    from mlmfilter.models.common import resolve_dtype

    return resolve_dtype(dtype, "cpu")


# -- the CLIP tower's image settings -----------------------------------------------------------------


def default_clip_image_settings(config) -> dict[str, Any]:
    """OpenAI CLIP's preprocessing at the tower's image size (shorter side resize, centre crop, bicubic)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = config.image_size
    return {
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "size": {"shortest_edge": side},
        "crop_size": {"height": side, "width": side},
        "resample": 3,  # bicubic
    }


def clip_image_settings(name: str, config, local_only: bool) -> dict[str, Any]:
    """The tower's own preprocessor settings (what LLaVA's CLIPImageProcessor.from_pretrained used)."""
    from transformers import AutoImageProcessor

    settings = default_clip_image_settings(config)
    try:
        processor = AutoImageProcessor.from_pretrained(name, **safe_pretrained_kwargs(local_files_only=local_only))
    except (OSError, ValueError):
        log.info("no preprocessor config for %s: using OpenAI CLIP defaults at %d px", name, config.image_size)
        return settings
    for field in ("image_mean", "image_std", "resample"):
        if getattr(processor, field, None) is not None:
            settings[field] = getattr(processor, field)
    for field in ("size", "crop_size"):
        value = getattr(processor, field, None)
        if value is not None:
            settings[field] = {k: v for k, v in dict(value).items() if v is not None}
    return settings


# -- writing the converted folder --------------------------------------------------------------------


def add_image_and_pad_tokens(tokenizer) -> int:
    """``<image>`` (and ``<pad>`` when the tokenizer has none) after the trained vocabulary; the image token's id."""
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


class EmbeddingResizer:
    """Grows embed_tokens / lm_head to the new vocabulary; new rows get the mean of the old ones.

    A mean row in lm_head scores exactly the average logit, so greedy decoding never picks an
    added token; in embed_tokens the <image> row is overwritten by image features and <pad> is
    masked, so their value only has to be finite.
    """

    def __init__(self, old_vocab: int, new_rows: int):
        self.old_vocab = old_vocab
        self.new_rows = new_rows

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        kept = weight[: self.old_vocab]
        mean = kept.float().mean(dim=0, keepdim=True).to(weight.dtype)
        extra = mean.expand(self.new_rows - self.old_vocab, -1)
        return torch.cat([kept, extra], dim=0)


def expected_tensors(model_class, config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every tensor name and shape of ``model_class(config)`` (built on the meta device: no memory),
    and the names it ties to another tensor (not written when ``tie_word_embeddings``)."""
    with torch.device("meta"):
        reference = model_class(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    tied = set(getattr(reference, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    return expected, tied


class ShardWriter:
    """Writes safetensors shards plus model.safetensors.index.json, remembering names and shapes."""

    def __init__(self, dst: Path, total: int):
        self.dst = dst
        self.total = total
        self.count = 0
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total_bytes = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.count += 1
        name = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        save_file(tensors, str(self.dst / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.shapes[key] = tuple(tensor.shape)
            self.total_bytes += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def check_complete(written: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: set[str]) -> None:
    """Every tensor the new model has must be written once with its exact shape, and nothing else."""
    missing = sorted(set(expected) - set(written) - tied)
    unexpected = sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(written) & set(expected) if written[k] != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise LlavaConversionError(f"converted weights do not fit LlavaForConditionalGeneration ({detail})")


def generation_config(checkpoint: OriginalLlavaCheckpoint, tokenizer):
    """The checkpoint's generation config (or the default one) with the converted tokenizer's special ids."""
    from transformers import GenerationConfig

    if (checkpoint.path / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(checkpoint.path))
    else:
        generation = GenerationConfig()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return generation
