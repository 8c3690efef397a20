"""LLaVA with LLaVA-Unified's ``aapool_mlp`` projector: the smallest faithful module transformers lacks.

``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o`` (and the author's Llama-3.2-3B + SigLIP projector) feed
the SigLIP patch grid (27x27 at 384 px) through ``nn.AdaptiveAvgPool2d((12, 12))`` before the usual
Linear-GELU-Linear, so the language model sees 144 image positions instead of 729
(``AvgPoolProjector`` in Victorwz/LLaVA-Unified ``llava/model/multimodal_projector/builder.py``).
Everything else is llava-hf: this module only swaps the projector and registers the result with
transformers' Auto classes under its own ``model_type``, so ``AutoModelForImageTextToText`` loads a
converted folder in-package, with no remote code. Importing this module registers it.

The processor is a plain ``LlavaProcessor`` that writes exactly ``pooled_image_tokens`` ``<image>``
tokens whatever the image size: its ``patch_size`` is the image size (one "patch") and
``num_additional_image_tokens`` the rest. The pooling, like the original's ``AdaptiveAvgPool2d``,
takes any patch grid, a multiple of the pooled side or not.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.models.llava.modeling_llava import LlavaModel

MODEL_TYPE = "mlmfilter_pooled_llava"


class PooledLlavaConfig(LlavaConfig):
    """LlavaConfig plus ``pooled_image_tokens``: the square number of positions the patch grid pools to."""

    model_type = MODEL_TYPE

    def __init__(self, pooled_image_tokens: int = 144, **kwargs):
        self.pooled_image_tokens = int(pooled_image_tokens)
        side = math.isqrt(self.pooled_image_tokens)
        if side * side != self.pooled_image_tokens:
            raise ValueError(f"pooled_image_tokens must be a square number, got {pooled_image_tokens}")
        super().__init__(**kwargs)


class PooledProjector(nn.Module):
    """(B, h*w, D) patch features -> average-pooled to (B, side*side, D) -> Linear-GELU-Linear."""

    def __init__(self, config: PooledLlavaConfig):
        super().__init__()
        self.side = math.isqrt(config.pooled_image_tokens)
        self.pool = nn.AdaptiveAvgPool2d((self.side, self.side))
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        batch, length, width = image_features.shape
        grid = math.isqrt(length)
        if grid * grid != length:
            raise ValueError(f"aapool_mlp needs a square patch grid, got {length} patches")
        maps = image_features.transpose(1, 2).reshape(batch, width, grid, grid)  # b (h w) d -> b d h w
        pooled = self.pool(maps).flatten(2).transpose(1, 2)  # b d h w -> b (h w) d
        return self.linear_2(self.act(self.linear_1(pooled)))


class PooledLlavaModel(LlavaModel):
    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig):
        super().__init__(config)
        self.multi_modal_projector = PooledProjector(config)
        self.post_init()


class PooledLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig):
        super().__init__(config)
        self.model = PooledLlavaModel(config)
        self.post_init()


def register() -> None:
    """Make the Auto classes know the model_type (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, PooledLlavaConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForImageTextToText.register(PooledLlavaConfig, PooledLlavaForConditionalGeneration)
    except ValueError:
        pass


register()
