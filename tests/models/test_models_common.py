"""Device/dtype resolution and provenance helpers shared by the model backends."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy
import PIL
import pytest
import torch
import transformers

from mlmfilter.models import common
from mlmfilter.models.common import (
    cpu_supports_bf16,
    dtype_name,
    library_versions,
    model_source,
    resolve_device,
    resolve_dtype,
    unavailable_message,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("FP32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("half", torch.float16),
    ],
)
def test_explicit_dtypes(name, expected):
    assert resolve_dtype(name, "cpu") is expected
    assert resolve_dtype(expected, "cpu") is expected


def test_unknown_dtype_lists_the_known_ones():
    with pytest.raises(ValueError, match="bf16"):
        resolve_dtype("int3", "cpu")


def test_auto_dtype_on_cpu_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_cpu_bf16_detection_reads_cpu_flags():
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    assert cpu_supports_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda:0")


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["bf16", "fp16", "fp32"]


def test_library_versions_match_the_imported_libraries():
    versions = library_versions()
    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["pillow"] == PIL.__version__
    assert versions["numpy"] == numpy.__version__
    assert versions["mlmfilter"]


def test_model_source_local_dir_and_hub_cache(tmp_path, monkeypatch):
    local = tmp_path / "my-model"
    local.mkdir()
    assert model_source(str(local)) == {"model": str(local), "local_path": str(local.resolve())}

    # a hub id whose files sit in the HF cache: the snapshot folder names the commit
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "cache" / "models--org--name"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    source = model_source("org/name")
    assert source["hub_id"] == "org/name" and source["commit"] == commit
    assert "commit" not in model_source("org/not-cached")


def test_unavailable_message_names_the_model_and_the_way_out():
    message = unavailable_message("org/model", OSError("no network"))
    assert "org/model" in message and "HF_HUB_OFFLINE=1" in message and "no network" in message
