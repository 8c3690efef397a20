"""Convert an original LLaVA-1.5 checkpoint (haotian-liu/LLaVA layout) into the llava-hf format.

The released ``weizhiwang/mlm-filter-llava-13b-gpt4v*`` judges are stored the way the LLaVA
training code saves them: a Llama/Vicuna ``LlavaLlamaForCausalLM`` whose config.json carries the
multimodal settings as ``mm_*`` fields, weights named ``model.layers.N...``, ``lm_head.weight`` and
``model.mm_projector.{0,2}.*``, and the CLIP vision tower referenced by name (``mm_vision_tower``)
rather than stored. Transformers cannot load that layout; this module rewrites it as a
``LlavaForConditionalGeneration`` folder (config, safetensors shards, tokenizer, processor with a
Vicuna v1 chat template) that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load.

The conversion streams one source shard at a time, so a 13B checkpoint needs about one shard of
memory, and it checks every written tensor's name and shape against the model transformers builds
from the new config before it returns.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

# conv_vicuna_v1's system prompt: the format LLaVA-1.5 (and the MLM-Filter LLaVA judges) were trained on
from mlmfilter.judge.conversations import REFERENCE_IMAGE_TOKEN as IMAGE_TOKEN
from mlmfilter.judge.conversations import VICUNA_V1_SYSTEM
from mlmfilter.models.common import safe_pretrained_kwargs, safe_weights_kwargs

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
#: the embedding matrices are padded to a multiple of this (as llava-hf does) for faster matmuls
EMBEDDING_PAD_MULTIPLE = 64

_ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower."
_TARGET_VISION_PREFIX = "model.vision_tower."
_FEATURE_STRATEGY = {"patch": "default", "cls_patch": "full"}
#: config.json fields that belong to LLaVA's multimodal wrapper, not to the Llama text model
_LLAVA_ONLY_FIELDS = re.compile(
    r"^(mm_|tune_mm|freeze_mm|use_mm|image_|tokenizer_|unfreeze_mm|s2|architectures$|model_type$|_name_or_path$)"
)
_WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
_SKIPPED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.image_newline$)")


class LlavaConversionError(ValueError):
    """The source folder is not a convertible LLaVA-1.5 checkpoint (the message says why)."""


def vicuna_v1_chat_template(eos_token: str, system: str = VICUNA_V1_SYSTEM) -> str:
    """Jinja chat template that renders LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO) exactly.

    ``system + " " + "USER: <image>\\n<text>" + " " + "ASSISTANT:"`` with a generation prompt,
    and ``"ASSISTANT: <answer>" + eos`` for past answers. Images come first in a user turn,
    each as ``<image>\\n``, as LLaVA places them. No BOS: the tokenizer adds it, as in LLaVA.
    """
    system_literal = json.dumps(system)
    eos_literal = json.dumps(eos_token)
    return (
        "{%- set ns = namespace(system=" + system_literal + ") -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
        "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- endfor -%}"
        "{{- ns.system + ' ' -}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}{%- else -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
        "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- " + eos_literal + " -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


# -- reading the original checkpoint ----------------------------------------------------------------


class OriginalLlavaCheckpoint:
    """A LLaVA-1.5 training-code checkpoint folder: raw config.json, weight shards, tokenizer files."""

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

    def text_config(self):
        """The Llama config, from config.json without LLaVA's multimodal fields."""
        from transformers import LlamaConfig

        fields = {k: v for k, v in self.config.items() if not _LLAVA_ONLY_FIELDS.match(k)}
        fields.pop("torch_dtype", None)
        fields.pop("dtype", None)
        if fields.get("rope_scaling") is None:  # old transformers wrote null; newer ones warn on it
            fields.pop("rope_scaling", None)
        return LlamaConfig.from_dict(fields)

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


# -- the vision tower --------------------------------------------------------------------------------


@dataclass
class VisionTower:
    """The CLIP vision tower: its config, where its weights come from, and its image settings."""

    config: Any  # CLIPVisionConfig
    embedded: bool  # weights are inside the LLaVA checkpoint (model.vision_tower.vision_tower.*)
    source: str | None  # hub id / path given by the user, when the weights come from there
    image_settings: dict[str, Any]  # mean/std/size for the image processor

    @classmethod
    def resolve(cls, checkpoint: OriginalLlavaCheckpoint, shapes: dict[str, tuple[int, ...]], name: str | None):
        embedded = any(k.startswith(_ORIGINAL_VISION_PREFIX) for k in shapes)
        if name is not None:
            config = _clip_vision_config(name, local_only=False)
            if config is None:
                raise LlavaConversionError(f"vision tower {name!r}: no CLIP vision config found there")
            settings = _clip_image_settings(name, config, local_only=False)
            return cls(config, embedded, None if embedded else name, settings)
        if not embedded:
            referenced = checkpoint.vision_tower_name or "openai/clip-vit-large-patch14-336"
            raise LlavaConversionError(
                f"{checkpoint.path} does not contain the vision tower (no {_ORIGINAL_VISION_PREFIX}* weights); "
                f"its config names {referenced!r}. Pass that CLIP model as vision_tower= (CLI: --vision-tower "
                f"{referenced}), as a hub id or the path of a local copy."
            )
        # Weights are embedded: take the config from the named tower if it is on this machine,
        # else read it off the tensor shapes (OpenAI CLIP conventions).
        referenced = checkpoint.vision_tower_name
        config = _clip_vision_config(referenced, local_only=True) if referenced else None
        if config is None:
            config = _infer_clip_vision_config(shapes)
            log.info("vision tower config inferred from the embedded weights: %s", config.to_diff_dict())
        settings = _clip_image_settings(referenced, config, local_only=True) if referenced else None
        return cls(config, True, None, settings or _default_image_settings(config))

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Weights of a separately stored tower, named as CLIPVisionModel names them."""
        from transformers import CLIPVisionModel

        # a separately stored tower (often openai's .bin-only repos): .bin is read with weights_only, never unpickled freely
        model = CLIPVisionModel.from_pretrained(self.source, **safe_weights_kwargs(dtype=dtype, use_safetensors=None))
        return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def _clip_vision_config(name: str, local_only: bool):
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(name, **safe_pretrained_kwargs(local_files_only=local_only))
    except (OSError, ValueError) as exc:
        if not local_only:
            raise LlavaConversionError(f"cannot load the vision tower {name!r}: {exc}") from exc
        return None


def _infer_clip_vision_config(shapes: dict[str, tuple[int, ...]]):
    """A CLIPVisionConfig from embedded tensor shapes; head size 64 and quick_gelu as in every OpenAI CLIP ViT."""
    from transformers import CLIPVisionConfig

    prefix = _ORIGINAL_VISION_PREFIX + "vision_model."
    hidden, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    grid = math.isqrt(positions - 1)
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch,
        image_size=grid * patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _default_image_settings(config) -> dict[str, Any]:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = config.image_size
    return {
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "size": {"shortest_edge": side},
        "crop_size": {"height": side, "width": side},
        "resample": 3,  # bicubic
    }


def _clip_image_settings(name: str, config, local_only: bool) -> dict[str, Any]:
    """The tower's own preprocessor settings (what LLaVA's CLIPImageProcessor.from_pretrained used)."""
    from transformers import AutoImageProcessor

    settings = _default_image_settings(config)
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


# -- writing the llava-hf folder --------------------------------------------------------------------


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


class KeyMapper:
    """Original LLaVA tensor names -> the names LlavaForConditionalGeneration uses in memory."""

    def __init__(self, expected: set[str]):
        self.expected = expected

    def __call__(self, key: str) -> str | None:
        if _SKIPPED_KEYS.search(key):
            return None
        if key.startswith(_ORIGINAL_VISION_PREFIX):
            rest = key[len(_ORIGINAL_VISION_PREFIX) :]
            # LLaVA saved CLIPVisionModel keys (vision_model.*); newer transformers may drop that level
            for candidate in (_TARGET_VISION_PREFIX + rest, _TARGET_VISION_PREFIX + rest.removeprefix("vision_model.")):
                if candidate in self.expected:
                    return candidate
            raise LlavaConversionError(f"vision tower tensor {key!r} has no place in LlavaForConditionalGeneration")
        if key.startswith("model.mm_projector."):
            index, _, param = key[len("model.mm_projector.") :].partition(".")
            layer = {"0": "linear_1", "2": "linear_2"}.get(index)
            if layer is None:
                raise LlavaConversionError(f"unexpected projector tensor {key!r} (mlp2x_gelu has layers 0 and 2)")
            return f"model.multi_modal_projector.{layer}.{param}"
        if key == "lm_head.weight":
            return key
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        raise LlavaConversionError(f"unexpected tensor {key!r} in the checkpoint")


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


def _resolve_target_dtype(dtype: str, checkpoint: OriginalLlavaCheckpoint) -> torch.dtype:
    if (dtype or "auto").strip().lower() == "auto":
        return checkpoint.source_dtype()
    from mlmfilter.models.common import resolve_dtype

    return resolve_dtype(dtype, "cpu")


def _load_tokenizer(checkpoint: OriginalLlavaCheckpoint):
    """The checkpoint's tokenizer, set up to split prompts around <image> the way LLaVA does.

    LLaVA encodes the text before and after ``<image>`` as separate strings (tokenizer_image_token),
    so SentencePiece puts its dummy-prefix "▁" at the start of the text after the image too
    ("\n" -> "▁", "<0x0A>"). A Llama tokenizer with ``legacy=False`` prepends "▁" only at the very
    start of the prompt; with ``legacy=True`` it prepends it after every added token, which is
    exactly LLaVA's chunking for an ``<image>`` prompt. Byte-level BPE tokenizers are unaffected.
    """
    from transformers import AutoTokenizer

    # config= keeps AutoTokenizer from parsing LLaVA's config.json (model_type llava_llama is unknown)
    kwargs: dict[str, Any] = safe_pretrained_kwargs(config=checkpoint.text_config())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), **kwargs)
        if _metaspace_scheme(tokenizer) == "first":
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), legacy=True, **kwargs)
            if _metaspace_scheme(tokenizer) != "always":
                raise LlavaConversionError(
                    f"cannot make the tokenizer of {checkpoint.path} prefix text after <image> as LLaVA does"
                )
            tokenizer.init_kwargs["legacy"] = True  # saved, so the converted tokenizer reloads the same way
        return tokenizer
    except (ImportError, ValueError, OSError) as exc:
        if isinstance(exc, LlavaConversionError):
            raise
        hint = ""
        if (checkpoint.path / "tokenizer.model").is_file() and not (checkpoint.path / "tokenizer.json").is_file():
            hint = (
                " The folder has only a SentencePiece tokenizer.model: converting it needs the "
                "`sentencepiece` and `protobuf` packages (pip install sentencepiece protobuf)."
            )
        raise LlavaConversionError(f"cannot load the tokenizer of {checkpoint.path}: {exc}.{hint}") from exc


def _metaspace_scheme(tokenizer) -> str | None:
    """SentencePiece-style tokenizers (Metaspace pre-tokenizer): when the "▁" prefix is added."""
    from tokenizers.pre_tokenizers import Metaspace

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    return pre.prepend_scheme if isinstance(pre, Metaspace) else None


def convert_llava_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str = "auto",
    vision_tower: str | None = None,
) -> Path:
    """Convert an original LLaVA-1.5 checkpoint folder ``src`` into a llava-hf folder ``dst``.

    Args:
        src: folder of the original checkpoint (config.json with ``mm_*`` fields, weight shards,
            tokenizer files), e.g. a download of ``weizhiwang/mlm-filter-llava-13b-gpt4v``.
        dst: output folder (created; existing files with the same names are overwritten).
        dtype: "auto" keeps the checkpoint's dtype; or fp32/bf16/fp16 (any name ``resolve_dtype`` knows).
        vision_tower: hub id or local path of the CLIP vision model (a CLIPVisionModel or CLIPModel
            checkpoint), normally the one config.json names in ``mm_vision_tower``
            (``openai/clip-vit-large-patch14-336``). Needed unless the checkpoint stores the tower
            itself (``model.vision_tower.vision_tower.*`` tensors, which then take precedence and
            this argument only supplies the config and image settings).

    Returns the output folder. Raises :class:`LlavaConversionError` with the reason when ``src``
    cannot be converted (e.g. no vision tower available, unsupported projector).

    What the converted model reproduces, and what it does not:

    * Model: exact. Vision features are CLIP ``hidden_states[mm_vision_select_layer]`` without the
      CLS token (``vision_feature_select_strategy="default"`` for "patch"), through the mlp2x_gelu
      projector (``linear_1``/``linear_2``, exact GELU), spliced in at the ``<image>`` tokens.
      ``<image>`` and, when the tokenizer has none, ``<pad>`` are added to the tokenizer; the
      embedding matrices grow to a multiple of 64 rows, new rows set to the mean of the old ones.
    * Prompt: the processor carries a chat template that renders LLaVA's conv_vicuna_v1
      (``"<system> USER: <image>\\n<text> ASSISTANT:"``), and the processor expands ``<image>``
      into the 576 (24x24) feature positions.
    * Image preprocessing: LLaVA-1.5 with ``image_aspect_ratio: "pad"`` first expands the photo to a
      square filled with the CLIP mean colour ``tuple(int(255 * m) for m in image_mean)`` (pasted
      centred), then applies CLIPImageProcessor (bicubic resize of the shorter side to 336, centre
      crop). llava-hf's published processors skip that padding (they resize + centre-crop, cutting
      off the sides of non-square photos). Transformers' ``LlavaImageProcessor`` implements the same
      expand-to-square (``do_pad=True``, mean-colour fill, centred), so the converted processor sets
      ``do_pad`` from ``image_aspect_ratio`` and reproduces LLaVA's pixels exactly with the PIL
      backend (the default when torchvision is not installed). With torchvision installed,
      transformers picks the torchvision backend, whose bicubic resize differs from PIL's by a few
      intensity levels at edges; load with ``AutoProcessor.from_pretrained(path, backend="pil")``
      if bit-identical pixels matter.
    * Tokenization: exact for single-turn prompts. LLaVA tokenizes the text before and after
      ``<image>`` as separate strings (``tokenizer_image_token``), so Llama's SentencePiece puts its
      dummy-prefix ``"▁"`` after the image too (``"\\n"`` -> ``"▁", "<0x0A>"``); llava-hf tokenizes
      the whole prompt, and a Llama tokenizer with ``legacy=False`` would drop that ``"▁"``. The
      converted tokenizer is saved with ``legacy=True`` (prefix after every added token), which
      gives LLaVA's ids; byte-level BPE tokenizers need no change.
    """
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    checkpoint = OriginalLlavaCheckpoint(src)
    checkpoint.check_supported()
    target_dtype = _resolve_target_dtype(dtype, checkpoint)
    shapes = checkpoint.key_shapes()
    tower = VisionTower.resolve(checkpoint, shapes, vision_tower)

    projector_in = shapes.get("model.mm_projector.0.weight")
    if projector_in is None:
        raise LlavaConversionError(f"{checkpoint.path} has no model.mm_projector.0.weight")
    if projector_in[1] != tower.config.hidden_size:
        raise LlavaConversionError(
            f"the projector expects {projector_in[1]}-wide vision features but the vision tower's hidden "
            f"size is {tower.config.hidden_size}: wrong vision tower for this checkpoint"
        )

    # tokenizer: <image> (+ <pad>) appended after the trained vocabulary
    tokenizer = _load_tokenizer(checkpoint)
    from transformers import AddedToken

    text_config = checkpoint.text_config()
    old_vocab = text_config.vocab_size
    if len(tokenizer) > old_vocab:
        raise LlavaConversionError(f"tokenizer has {len(tokenizer)} tokens but the embeddings only {old_vocab} rows")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    new_rows = max(len(tokenizer), old_vocab)
    new_rows = math.ceil(new_rows / EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    resize = EmbeddingResizer(old_vocab, new_rows)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_config.vocab_size = new_rows
    text_config.pad_token_id = tokenizer.pad_token_id
    patches = (tower.config.image_size // tower.config.patch_size) ** 2
    strategy = checkpoint.vision_feature_strategy
    config = LlavaConfig(
        text_config=text_config,
        vision_config=tower.config,
        image_token_index=image_token_id,
        image_seq_length=patches if strategy == "default" else patches + 1,
        projector_hidden_act="gelu",
        vision_feature_layer=checkpoint.vision_select_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias="model.mm_projector.0.bias" in shapes,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    config.dtype = target_dtype
    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    tied = set(getattr(reference, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    del reference

    out = Path(dst).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rename = KeyMapper(set(expected))
    writer = ShardWriter(out, total=len(checkpoint.weight_files) + (0 if tower.embedded else 1))
    for weight_file in checkpoint.weight_files:
        shard: dict[str, torch.Tensor] = {}
        for key, tensor in checkpoint.iter_tensors(weight_file):
            target = rename(key)
            if target is None:
                continue
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                tensor = resize(tensor)
            shard[target] = tensor.to(target_dtype).contiguous()
        writer.write(shard)
        log.info("converted %s (%d tensors)", weight_file.name, len(shard))
    if not tower.embedded:
        writer.write({_TARGET_VISION_PREFIX + k: v for k, v in tower.tensors(target_dtype).items()})
    writer.finish()
    _check_complete(writer.shapes, expected, tied)

    config.save_pretrained(out)
    _generation_config(checkpoint, tokenizer, GenerationConfig).save_pretrained(out)
    image_processor = LlavaImageProcessorPil(
        do_pad=checkpoint.pads_to_square, do_resize=True, do_center_crop=True, **tower.image_settings
    )
    tokenizer.chat_template = vicuna_v1_chat_template(tokenizer.eos_token or "</s>")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS position, dropped again by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    return out


def _check_complete(written: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: set[str]) -> None:
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


def _generation_config(checkpoint: OriginalLlavaCheckpoint, tokenizer, generation_config_cls):
    if (checkpoint.path / "generation_config.json").is_file():
        generation = generation_config_cls.from_pretrained(str(checkpoint.path))
    else:
        generation = generation_config_cls()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return generation
