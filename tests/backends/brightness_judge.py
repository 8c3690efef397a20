"""A judge backend written the way a new one is: this one file, plus one line in ``mlmfilter.backends.BACKENDS``
(tests/backends/test_backend_registry.py adds the line for the length of a test).

It answers every prompt with the image's mean brightness on 0..100 (its grey level, rounded), all the
probability on that number, so the scores it gives through the MLM scorer can be checked against the
decoded pixels. Prompts containing ``[refuse]`` get a RequestFailure, as a server refusing one pair would.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.backends.base import BackendInfo
from mlmfilter.core import errors
from mlmfilter.judge.backend import BackendCapabilities, JudgeRequest, RequestFailure

DEFINITION = "P(round(mean grey level / 255 * 100)) = 1"

#: every judge this module built, in order (a test checks that each was closed)
BUILT: list[BrightnessJudge] = []


class BrightnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"label"})

    image_size: int = Field(32, ge=8)
    #: a name for logs: changes no score, so it is not part of a run's identity
    label: str = ""


def brightness(image) -> int:
    return int(round(float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255 * 100))


class BrightnessJudge:
    def __init__(self, model: str, settings: BrightnessOptions):
        self.model = model
        self.settings = settings
        self.closed = False

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities("exact", self.settings.image_size, 16)

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray | RequestFailure]:
        out: list[np.ndarray | RequestFailure] = []
        for request in requests:
            if any("[refuse]" in p for p in request.prompts):
                out.append(RequestFailure(errors.SCORER_ERROR, "the brightness judge refused"))
                continue
            log_probs = np.full((len(request.prompts), 101), -np.inf)
            log_probs[:, brightness(request.image)] = 0.0
            out.append(log_probs)
        return out

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None) -> list[list[str]]:
        return [[str(brightness(r.image))] * len(r.prompts) for r in requests]

    def describe(self) -> dict[str, Any]:
        return INFO.describe_settings_of(self.model, self.settings)

    def readout_provenance(self) -> dict[str, str]:
        return {"readout_definition": DEFINITION, "readout_bound": "exact"}

    def close(self) -> None:
        self.closed = True


class BrightnessInfo(BackendInfo):
    name = "brightness"
    Options = BrightnessOptions
    distribution = "exact"
    runs_in_process = False

    def image_size(self, options: Any) -> int:
        return self.settings(options).image_size

    def describe_settings(self, options: Any) -> dict[str, Any]:
        return self.describe_settings_of(options.model, self.settings(options))

    @staticmethod
    def describe_settings_of(model: str, settings: BrightnessOptions) -> dict[str, Any]:
        return {"backend": "brightness", "model": model, "image_size": settings.image_size}

    def readout_provenance(self, options: Any) -> dict[str, str]:
        return {"readout_definition": DEFINITION, "readout_bound": "exact"}

    def build(self, options: Any, released: Any = None) -> BrightnessJudge:
        judge = BrightnessJudge(options.model, self.settings(options))
        BUILT.append(judge)
        return judge


INFO = BrightnessInfo()
