"""Loading a model never runs code from its folder: no ``auto_map`` module is imported, no pickle is
unpickled. Real tiny model folders of real architectures, planted with code that leaves a marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mlmfilter.convert.llava import LlavaConversionError, convert_llava_checkpoint
from mlmfilter.models.clip import inspect_clip, load_clip
from mlmfilter.models.vlm import inspect_vlm, load_vlm
from tests.support import mlm as mlm_support
from tests.support.llava import (
    original_llava_state,
    released_style_config,
    tiny_clip_tower,
    tiny_llama_config,
    write_bin_shards,
)
from tests.support.security import Payload, plant_code


@pytest.fixture(autouse=True)
def user_says_yes(monkeypatch):
    """transformers asks on stdin before running a folder's code; a user (or `yes |`) answering "y"
    must not matter: mlmfilter never lets it ask."""
    monkeypatch.setattr("builtins.input", lambda *args, **kwargs: "y")


@pytest.fixture(scope="module")
def llava_dir() -> Path:
    return mlm_support.tiny_model_dir("llava")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_vlm_folder_with_auto_map_loads_the_library_class_and_runs_nothing(llava_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = plant_code(copy_of(llava_dir, tmp_path), marker)
    spec = inspect_vlm(str(folder))
    loaded = load_vlm(str(folder), device="cpu", dtype="fp32")
    assert spec.family.name == "llava" and type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert not marker.exists()


def test_vlm_folder_needing_its_own_code_is_refused_clearly(llava_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = plant_code(copy_of(llava_dir, tmp_path), marker, unknown_model_type=True)
    with pytest.raises(ValueError, match="not a transformers image-text-to-text model"):
        inspect_vlm(str(folder))
    with pytest.raises(ValueError):
        load_vlm(str(folder), device="cpu", dtype="fp32")
    assert not marker.exists()


def test_pickled_vlm_weights_are_refused_never_unpickled(llava_dir, tmp_path):
    marker = tmp_path / "unpickled"
    folder = copy_of(llava_dir, tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save({"payload": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_vlm(str(folder), device="cpu", dtype="fp32")
    assert not marker.exists()


def test_clip_folder_with_auto_map_runs_nothing(tiny_clip_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = plant_code(copy_of(tiny_clip_dir, tmp_path), marker)
    loaded = load_clip(str(folder), device="cpu", dtype="fp32")
    assert type(loaded.model).__name__ == "CLIPModel" and not loaded.is_random
    assert not marker.exists()

    strange = plant_code(copy_of(tiny_clip_dir, tmp_path / "unknown"), marker, unknown_model_type=True)
    with pytest.raises(ValueError):
        inspect_clip(str(strange))
    assert not marker.exists()


def test_convert_llava_runs_no_folder_code_and_unpickles_nothing(tmp_path):
    from transformers import AutoTokenizer

    marker = tmp_path / "ran"
    src, tower_dir = tmp_path / "original", tmp_path / "tower"
    src.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(str(mlm_support.tiny_model_dir("llava")))
    tokenizer.save_pretrained(src)
    llama_config = tiny_llama_config(len(tokenizer))
    tiny_clip_tower(tower_dir, hidden=48, heads=4, seed=1)
    write_bin_shards(src, original_llava_state(llama_config, mm_hidden=48, seed=2), shards=1)
    (src / "config.json").write_text(
        json.dumps(released_style_config(llama_config, "openai/clip-vit-large-patch14-336", 48, "float32"))
    )
    plant_code(src, marker)
    plant_code(tower_dir, marker)
    out = convert_llava_checkpoint(src, tmp_path / "converted", vision_tower=str(tower_dir))
    assert (out / "config.json").is_file() and not marker.exists()

    torch.save({"payload": Payload(marker)}, src / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(LlavaConversionError, match="weights_only"):
        convert_llava_checkpoint(src, tmp_path / "again", vision_tower=str(tower_dir))
    assert not marker.exists()
