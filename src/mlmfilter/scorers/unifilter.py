"""UniFilter as a scorer: a quality classifier over SigLIP + a small Qwen, one forward and one float per pair.

Column ``unifilter_score`` (float32): the score head's output at the pair's last token. The released
checkpoints have a one-row head trained with mean-squared error towards quality levels 0..3: the raw
value, higher is better, not clamped (a two-row head gives the probability of the positive class);
``provenance.json`` says which (``score_definition``). An empty caption is an ``empty_caption`` row.

The model is named like the judges: a hub id (``weizhiwang/UniFilter-Qwen2.5-1.5B``, the default;
``weizhiwang/UniFilter-Qwen3-0.6B``) fetched through the Hugging Face cache (``HF_HUB_OFFLINE=1``: the
cache alone), or a local copy in the original layout. Nothing is converted: the checkpoint loads as
saved (:mod:`mlmfilter.models.unifilter`), the vision tower from the hub id its config names (or
``vision_tower``). ``checkpoint_settings`` picks the request (:mod:`mlmfilter.judge.unifilter`):
``released-script`` (default) as the released caption scorer builds it (no padding, the first 75 ids),
``trained`` as the training data was (pad to a square where ``image_aspect_ratio`` is ``pad``, the
whole caption). Images reach the tower's processor whole (the decode rule of the released judges:
full resolution up to 4x its size on the shorter side), so its square resize is the only one.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.judge.unifilter import (
    RequestTokenizer,
    request_settings,
    score_definition,
    split_on_image,
)
from mlmfilter.models.vlm_families import exact_decode_side
from mlmfilter.scorers.base import ScoreFailure, Scorer, ScorerOptions

DEFAULT_MODEL = "weizhiwang/UniFilter-Qwen2.5-1.5B"
SCORE_COLUMN = "unifilter_score"


class UniFilterOptions(ScorerOptions):
    model: str = DEFAULT_MODEL
    #: hub revision (branch, tag or commit) of ``model``; default: main
    revision: str | None = None
    #: the SigLIP tower (hub id or folder); default: the one config.json names in mm_vision_tower
    vision_tower: str | None = None
    #: released-script: as the released caption scorer asks (no padding, 75 ids); trained: as trained
    checkpoint_settings: Literal["released-script", "trained"] = "released-script"
    device: str = "auto"
    #: auto = bf16 on a GPU, bf16 on a CPU with native bf16, else fp32
    dtype: str = "auto"
    batch_size: int = Field(default=32, ge=1)


class UniFilterScorer(Scorer):
    Options = UniFilterOptions
    name = "unifilter"
    model_option = "model"
    columns = {SCORE_COLUMN: pa.float32()}

    def __init__(self, options: UniFilterOptions | None = None):
        super().__init__(options)
        self.loaded = None  # LoadedUniFilter after setup()
        self.requests: RequestTokenizer | None = None

    def _spec(self):
        from mlmfilter.models.unifilter import inspect_unifilter

        o = self.options
        return inspect_unifilter(o.model, o.revision, o.vision_tower)

    def _request(self):
        spec = self._spec()
        return request_settings(self.options.checkpoint_settings, spec.trained_pad_to_square)

    @property
    def image_size(self) -> int:  # type: ignore[override]
        """Shorter side to decode to: the whole image up to 4x the tower's size (config files only)."""
        return exact_decode_side(self._spec().pixels.side)  # DEVELOPERS.md "Released judges: one resize"

    def wants_gpu(self) -> bool:
        from mlmfilter.models.common import may_use_gpu

        return may_use_gpu(self.options.device)

    def setup(self) -> None:
        from mlmfilter.models.unifilter import load_unifilter

        o = self.options
        self.loaded = load_unifilter(o.model, o.device, o.dtype, o.revision, o.vision_tower)
        self.requests = RequestTokenizer(self.loaded.tokenizer, self._request())

    def close(self) -> None:
        self.loaded, self.requests, self._ready = None, None, False

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        import torch

        from mlmfilter.images.pixels import pad_to_square, to_pixel_values
        from mlmfilter.models.unifilter import readout

        results: list[dict[str, Any] | ScoreFailure | None] = [None] * len(samples)
        todo = []
        for i, sample in enumerate(samples):
            if not (sample.caption or "").strip():
                results[i] = ScoreFailure(errors.EMPTY_CAPTION, "the caption is empty")
            elif sample.image is None:
                results[i] = ScoreFailure(errors.MISSING_IMAGE, "no decoded image reached the UniFilter scorer")
            else:
                todo.append(i)
        if not todo:
            return results  # type: ignore[return-value]
        loaded, request = self.loaded, self.requests.request
        pixels = loaded.spec.pixels
        images = [samples[i].image for i in todo]
        if request.pad_to_square:
            images = [pad_to_square(image, pixels.mean) for image in images]
        bf16 = loaded.dtype == torch.bfloat16
        values = to_pixel_values(
            images,
            pixels.side,
            pixels.mean,
            pixels.std,
            crop=False,
            dtype=loaded.dtype if bf16 else None,
            resample=pixels.resample,
        )
        if loaded.device.type == "cuda":
            values = values.pin_memory().to(loaded.device, non_blocking=True)
        rows = [split_on_image(ids) for ids in self.requests.ids([samples[i].caption for i in todo])]
        with torch.inference_mode():
            scores = readout(loaded.model(values.to(loaded.device), rows))
        for i, score in zip(todo, scores):
            results[i] = {SCORE_COLUMN: score}
        return results  # type: ignore[return-value]

    def provenance(self) -> dict[str, Any]:
        """Checkpoint (repo, commit or content hash), tower, request, what the score means, dtype, versions."""
        if self.loaded is not None:
            spec, model_prov = self.loaded.spec, dict(self.loaded.provenance)
        else:  # before setup: the same description from config files, without loading weights
            from mlmfilter.models.common import resolve_device, resolve_dtype
            from mlmfilter.models.unifilter import unifilter_provenance

            spec = self._spec()
            device = resolve_device(self.options.device)
            model_prov = unifilter_provenance(spec, device, resolve_dtype(self.options.dtype, device))
        return {
            **super().provenance(),
            **model_prov,
            "requested_dtype": self.options.dtype,
            "checkpoint_settings": self.options.checkpoint_settings,
            "request": self._request().as_dict(),
            "request_text": '"<image>\\n" + caption (a literal <image> in the caption written "image")',
            "score_definition": score_definition(spec.num_labels),
            "decoded_shorter_side_up_to": self.image_size,
        }
