"""Build real WebDataset tar shards for tests."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterable

from mlmfilter.io.writers import add_tar_member


def write_shard(path: Path, samples: Iterable[dict]) -> Path:
    """samples: dicts with key and any of jpg/png (bytes), txt (str|bytes), json (dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["key"]
            for ext in ("jpg", "png", "webp"):
                if ext in sample:
                    add_tar_member(tar, f"{key}.{ext}", sample[ext])
            if "txt" in sample:
                txt = sample["txt"]
                add_tar_member(tar, f"{key}.txt", txt.encode("utf-8") if isinstance(txt, str) else txt)
            if "json" in sample:
                add_tar_member(tar, f"{key}.json", json.dumps(sample["json"]).encode())
    return path


def flickr_shards(pairs: list[tuple[Path, str]], out_dir: Path, n_shards: int, per_shard: int) -> list[Path]:
    """n_shards tars of real Flickr8k JPEG bytes + captions, img2dataset-style keys."""
    paths = []
    for s in range(n_shards):
        chunk = [pairs[(s * per_shard + i) % len(pairs)] for i in range(per_shard)]
        samples = [
            {"key": f"{s:05d}{i:04d}", "jpg": img.read_bytes(), "txt": caption}
            for i, (img, caption) in enumerate(chunk)
        ]
        paths.append(write_shard(out_dir / f"{s:08d}.tar", samples))
    return paths


def scores_dataset(run_dir, stage: str = "score"):
    """The completed shards' tables of a run's stage, through the run layer's read API."""
    from mlmfilter.runs.read import RunReader

    return RunReader(run_dir).dataset(stage)


def build_tiny_clip(folder: Path, seed: int = 1) -> Path:
    """A randomly initialised CLIPModel of the real architecture (real CLIP BPE tokenizer from
    ../shared), saved as a user's checkpoint would be."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from tests.support.data import shared_path

    vocab = shared_path("models", "clip-tokenizer")
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)  # shortest edge 224, center crop 224, OpenAI mean/std
    return folder


def dying_initializer(*_args) -> None:
    """A pool initializer that kills its worker: a decode pool that cannot work at all."""
    import os

    os._exit(3)
