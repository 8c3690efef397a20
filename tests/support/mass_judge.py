"""A judge backend whose probability mass on the numbers is chosen per pair (register it for a test with
``monkeypatch.setitem(mlmfilter.backends.BACKENDS, *LINE)``).

Every prompt is answered with the image's mean brightness on 0..100; the probability on that number is
1 (a judge that answers with a number), or :data:`DIM_MASS` when the caption holds ``[dim]`` (a judge
that mostly writes something else): the readout's mean is the same number either way, only the mass
tells the two apart.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from mlmfilter.backends.base import BackendInfo
from mlmfilter.judge.backend import BackendCapabilities, JudgeRequest

LINE = ("mass", "tests.support.mass_judge:INFO")
DIM = "[dim]"
DIM_MASS = 0.001


class MassOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def brightness(image) -> int:
    return int(round(float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255 * 100))


class MassJudge:
    def __init__(self, model: str):
        self.model = model

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities("exact", 32, 16)

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray]:
        out = []
        for request in requests:
            log_probs = np.full((len(request.prompts), 101), -np.inf)
            for row, prompt in enumerate(request.prompts):
                log_probs[row, brightness(request.image)] = math.log(DIM_MASS) if DIM in prompt else 0.0
            out.append(log_probs)
        return out

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None) -> list[list[str]]:
        return [[str(brightness(r.image))] * len(r.prompts) for r in requests]

    def describe(self) -> dict[str, Any]:
        return {"backend": "mass", "model": self.model}

    def readout_provenance(self) -> dict[str, str]:
        return {"readout_definition": "all the number probability on the brightness", "readout_bound": "exact"}

    def close(self) -> None:
        pass


class MassInfo(BackendInfo):
    name = "mass"
    Options = MassOptions
    distribution = "exact"
    runs_in_process = False

    def image_size(self, options: Any) -> int:
        return 32

    def describe_settings(self, options: Any) -> dict[str, Any]:
        return {"backend": "mass", "model": options.model}

    def readout_provenance(self, options: Any) -> dict[str, str]:
        return {"readout_definition": "all the number probability on the brightness", "readout_bound": "exact"}

    def build(self, options: Any, released: Any = None) -> MassJudge:
        return MassJudge(options.model)


INFO = MassInfo()
