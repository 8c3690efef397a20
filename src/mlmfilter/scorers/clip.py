"""CLIPScore (Hessel et al., 2021): how well a caption matches its image, by a CLIP-family dual encoder.

Columns
- ``clip_cosine``: cosine similarity of the L2-normalised image and text embeddings, in [-1, 1].
- ``clip_score``: ``2.5 * max(clip_cosine, 0)``, the CLIPScore of Hessel et al. The 2.5 weight was chosen
  for OpenAI CLIP ViT-B/32 to stretch its cosines over [0, 1]-ish; for SigLIP (or other models) the column
  is computed the same way, but compare models by ``clip_cosine``, or rank within one model.

``image_size`` is resolved lazily from the model's config files (no weights), because the pipeline asks for
it before decoding, in the main process, while ``setup()`` loads weights once per worker.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.scorers.base import ScoreFailure, Scorer, ScorerOptions
from mlmfilter.scorers.text_mask import TextMasking, TextMaskOptions

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021, for OpenAI CLIP ViT-B/32
CLIPSCORE_FORMULA = f"clip_score = {CLIPSCORE_WEIGHT} * max(clip_cosine, 0)  (Hessel et al. 2021)"


class ClipScorer(TextMasking, Scorer):
    """Scores each pair with one image forward and one text forward per batch."""

    class Options(TextMaskOptions):  # mask_text: T-MARS, see scorers/text_mask.py
        model: str = "openai/clip-vit-base-patch32"
        device: str = "cpu"
        #: auto = bf16 on a CPU with native bf16 (avx512_bf16/amx) or a bf16 GPU, fp16 on older GPUs, else fp32
        dtype: str = "auto"
        batch_size: int = 64
        #: when the model is unavailable, score with a tiny random CLIP (meaningless scores; for demos/tests)
        allow_random_fallback: bool = False
        #: also keep the image and text embeddings of this same forward (and the image hashes) in the
        #: run, as `mlmfilter embed` does: what dedup, distill and `teach sample` read (no second pass)
        embeddings: bool = False

    name = "clip"
    model_option = "model"
    columns = {"clip_cosine": pa.float32(), "clip_score": pa.float32()}

    def __init__(self, options: ScorerOptions | None = None):
        super().__init__(options)
        self.loaded = None  # LoadedClip after setup()
        self.outputs = None  # the embedding columns, when kept
        if self.options.embeddings:
            from mlmfilter.scorers.embed import EmbeddingOutputs, clip_embedding_info

            spec = self._spec()
            kept = (
                spec.embedding_dim,
                {**clip_embedding_info(spec, self.options.model), "mask_text": self.options.mask_text},
            )
            self.outputs = EmbeddingOutputs(kept, kept, hashes=True)
            self.columns = {**type(self).columns, **self.outputs.columns()}
            self.wants_image_digest = True

    def schema_fields(self) -> list[pa.Field]:
        own = [pa.field(name, dtype) for name, dtype in type(self).columns.items()]
        return own + (self.outputs.fields() if self.outputs is not None else [])

    @property
    def image_size(self) -> int:  # type: ignore[override]
        """Shorter side the model's preprocessor resizes to, from config files (cheap, cached)."""
        if self.loaded is not None:
            return self.loaded.image_size
        return self._spec().preprocessing.image_size

    def _spec(self):
        from mlmfilter.models.clip import inspect_clip

        return inspect_clip(self.options.model, self.options.allow_random_fallback)

    def wants_gpu(self) -> bool:
        from mlmfilter.models.common import may_use_gpu

        return may_use_gpu(self.options.device)

    def setup(self) -> None:
        from mlmfilter.models.clip import load_clip

        self.loaded = load_clip(  # logs a loud warning itself when it falls back to random weights
            self.options.model,
            device=self.options.device,
            dtype=self.options.dtype,
            allow_random_fallback=self.options.allow_random_fallback,
        )

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        import torch

        from mlmfilter.images.pixels import to_pixel_values

        results: list[dict[str, Any] | ScoreFailure | None] = [None] * len(samples)
        todo = []
        for i, sample in enumerate(samples):
            if sample.image is None:
                results[i] = ScoreFailure(errors.MISSING_IMAGE, "no decoded image reached the CLIP scorer")
            elif sample.caption is None:
                results[i] = ScoreFailure(errors.MISSING_CAPTION, "no caption")
            else:
                todo.append(i)
        if todo:
            clip = self.loaded
            pre = clip.preprocessing
            pixels = to_pixel_values(
                [self.masked(samples[i].image_at(self.image_size)) for i in todo],
                pre.crop_size,
                pre.mean,
                pre.std,
                crop=pre.center_crop,
                dtype=clip.dtype if clip.dtype == torch.bfloat16 else None,
            )
            with torch.inference_mode():
                image_emb = clip.image_embeddings(pixels)
                text_emb = clip.text_embeddings([samples[i].caption for i in todo])
                cosines = cosine_fp32(image_emb, text_emb).tolist()
            kept = self._kept_embeddings([samples[i] for i in todo], image_emb, text_emb)
            for n, (i, cos) in enumerate(zip(todo, cosines)):
                results[i] = {"clip_cosine": cos, "clip_score": clip_score(cos), **kept[n]}
        return results  # type: ignore[return-value]

    def _kept_embeddings(self, samples: Sequence[Sample], image_emb, text_emb) -> list[dict[str, Any]]:
        """The embedding columns of this forward (``embeddings``), else nothing."""
        if self.outputs is None:
            return [{} for _ in samples]
        from mlmfilter.scorers.embed import unit_fp16

        return self.outputs.rows(samples, unit_fp16(image_emb), unit_fp16(text_emb))

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if not self.options.embeddings:  # runs made before the option existed resume under the same identity
            identity["options"].pop("embeddings", None)
        return identity

    def provenance(self) -> dict[str, Any]:
        """Loader provenance (model, commit/path, preprocessing, dtype actually used, versions) + formula."""
        if self.loaded is not None:
            model_prov = dict(self.loaded.provenance)
        else:  # before setup: the same description from config files, without loading weights
            from mlmfilter.models.clip import clip_provenance
            from mlmfilter.models.common import resolve_device, resolve_dtype

            device = resolve_device(self.options.device)
            model_prov = clip_provenance(self._spec(), device, resolve_dtype(self.options.dtype, device))
        return {
            **super().provenance(),
            **model_prov,
            "requested_dtype": self.options.dtype,
            "clip_score_formula": CLIPSCORE_FORMULA,
            **self.text_mask_provenance(),
            **({"embeddings": self.outputs.provenance()} if self.outputs is not None else {}),
        }


def cosine_fp32(a, b):
    """Row-wise cosine of two N x D embeddings, normalised and dotted in fp32 whatever the model dtype."""
    import torch.nn.functional as F

    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return (a * b).sum(dim=-1)


def clip_score(cosine: float) -> float:
    return CLIPSCORE_WEIGHT * max(cosine, 0.0)
