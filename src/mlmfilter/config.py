"""Run configuration: one pydantic model, filled from CLI flags or a YAML recipe with the same fields.

Every field is validated when the model is built (read options and scorer options included), so
a typo in a recipe is refused before anything is written or any shard is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlmfilter.images.decode import DEFAULT_MAX_PIXELS
from mlmfilter.io.readers import ReadOptions
from mlmfilter.runs.executors import ExecutorName
from mlmfilter.runs.executors.ray import RayOptions
from mlmfilter.scorers.stage import ScorerSpec, names_to_specs

__all__ = ["ScoreConfig", "ScorerSpec", "load_recipe"]


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str]
    output: str
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [ScorerSpec(name="rules")])
    read: ReadOptions = Field(default_factory=ReadOptions)
    stage: str = "score"  # the stage's folder in the run: a second scoring with other scorers takes another name
    workers: int = 1  # shards scored in parallel, one process each
    decode_workers: int = 1  # image-decoding processes feeding each shard worker (0: decode inline)
    chunk_size: int = 64  # samples handed to the scorers at a time (decoding runs a chunk ahead)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit on the source image
    only: str | None = None  # cascade: score only pairs passing this expression over `only_stage`
    only_stage: str = "score"
    executor: ExecutorName = "local"  # ray: shards over a Ray cluster's actors (optional extra)
    ray: RayOptions = Field(default_factory=RayOptions)  # used by executor="ray"

    _names_to_specs = field_validator("scorers", mode="before")(classmethod(lambda cls, v: names_to_specs(v)))

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def read_options(self) -> dict[str, Any]:
        """The read options that differ from the defaults (what run.yaml records)."""
        return self.read.model_dump(mode="json", exclude_defaults=True)


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of ScoreConfig fields")
    return data
