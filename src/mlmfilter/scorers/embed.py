"""Image and text embeddings per pair, kept in the run (``mlmfilter embed``, or ``score --scorer embed``).

Columns (the contract is :mod:`mlmfilter.runs.embeddings`):

- ``image_embedding``: the CLIP-family image embedding (CLIP / SigLIP through transformers, or
  ``open_clip:ARCH/PRETRAINED`` with the open-clip extra), L2-normalised, float16;
- ``text_embedding``: the caption's embedding by the same model's text tower (``text_model="clip"``),
  or by a sentence encoder (``"minilm"``: the bundled all-MiniLM-L6-v2, or a local
  sentence-transformers folder), L2-normalised, float16;
- ``image_digest`` / ``image_phash``: the encoded bytes' BLAKE2b-64 and the decoded pixels' DCT
  perceptual hash (``hashes``), which ``mlmfilter dedup`` compares for exact duplicates.

``model="none"`` with ``text_model="minilm"`` is the text-only embedder (no CLIP forward; images are
still decoded, for their hashes and to find the unreadable ones). The CLIP scorer keeps the same
columns from its own forward when asked (``clip`` option ``embeddings``): :class:`EmbeddingOutputs`
is what both share.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.runs.embeddings import IMAGE_DIGEST, IMAGE_PHASH, embedding_field, hash_fields
from mlmfilter.scorers.base import IMAGE_DIGEST_META, ScoreFailure, Scorer, ScorerOptions

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
NONE = "none"


def unit_fp16(vectors) -> np.ndarray:
    """Rows L2-normalised in fp32 (whatever the model's dtype), stored as float16."""
    import torch

    tensor = torch.as_tensor(vectors).float()
    return torch.nn.functional.normalize(tensor, dim=-1).cpu().numpy().astype(np.float16)


class EmbeddingOutputs:
    """The embedding and hash columns of a scorer: fields with their provenance, and row values.

    ``image`` / ``text``: (dim, info) of each modality kept, or None; ``hashes``: also the digests."""

    def __init__(self, image: tuple[int, dict] | None, text: tuple[int, dict] | None, hashes: bool):
        self.image, self.text, self.hashes = image, text, hashes

    def fields(self) -> list[pa.Field]:
        out = []
        if self.image is not None:
            out.append(embedding_field("image", *self.image))
        if self.text is not None:
            out.append(embedding_field("text", *self.text))
        return out + (hash_fields() if self.hashes else [])

    def columns(self) -> dict[str, pa.DataType]:
        return {f.name: f.type for f in self.fields()}

    def rows(self, samples: Sequence[Sample], image: np.ndarray | None, text: np.ndarray | None) -> list[dict]:
        """One dict per sample: its embedding rows (float16 arrays) and hashes."""
        from mlmfilter.images.phash import phash

        rows: list[dict[str, Any]] = [{} for _ in samples]
        for i, (row, sample) in enumerate(zip(rows, samples)):
            if image is not None:
                row["image_embedding"] = image[i]
            if text is not None:
                row["text_embedding"] = text[i]
            if self.hashes:
                row[IMAGE_DIGEST] = sample.meta.get(IMAGE_DIGEST_META)
                row[IMAGE_PHASH] = phash(sample.image) if sample.image is not None else None
        return rows

    def provenance(self) -> dict[str, Any]:
        from mlmfilter.images.phash import PHASH_BITS_SIDE, PHASH_SIDE

        out: dict[str, Any] = {"normalization": "l2 (fp32), stored float16"}
        if self.image is not None:
            out["image"] = {"dim": self.image[0], **self.image[1]}
        if self.text is not None:
            out["text"] = {"dim": self.text[0], **self.text[1]}
        if self.hashes:
            out["hashes"] = {
                IMAGE_DIGEST: "BLAKE2b-64 of the encoded image bytes",
                IMAGE_PHASH: f"DCT pHash: greyscale {PHASH_SIDE}x{PHASH_SIDE} Lanczos, "
                f"{PHASH_BITS_SIDE}x{PHASH_BITS_SIDE} lowest DCT-II frequencies > their median, of the decoded image",
            }
        return out


def clip_embedding_info(spec, requested: str) -> dict[str, Any]:
    """What a CLIP-family model's embeddings are, for column metadata (no weights loaded)."""
    return {
        "model": requested,
        "family": spec.family,
        "source": {k: v for k, v in spec.source.items() if k in ("hub_id", "commit", "local_path", "model")},
        "random_weights": spec.is_random,
    }


class EmbedScorer(Scorer):
    """CLIP image (+ text) embeddings, or sentence embeddings of captions, and the image hashes."""

    class Options(ScorerOptions):
        #: CLIP / SigLIP hub id or folder, or open_clip:ARCH/PRETRAINED; "none": no image embedding
        model: str = DEFAULT_MODEL
        #: "clip": the model's own text tower; "minilm" (bundled all-MiniLM-L6-v2) or a local
        #: sentence-transformers folder; "none": no text embedding
        text_model: str = "clip"
        device: str = "cpu"
        dtype: str = "auto"  # of the CLIP forward; the stored vectors are float16 whatever it is
        batch_size: int = 64
        #: when the CLIP model is unavailable, embed with a tiny random CLIP (meaningless vectors; demos/tests)
        allow_random_fallback: bool = False
        #: image_digest + image_phash, for exact duplicates (`mlmfilter dedup`)
        hashes: bool = True

    name = "embed"
    model_option = "model"
    wants_image_digest = True

    def __init__(self, options: ScorerOptions | None = None):
        super().__init__(options)
        opts = self.options
        if opts.model == NONE and opts.text_model in (NONE, "clip"):
            raise ValueError(
                "embed: nothing to embed; give a CLIP model, or text_model 'minilm' (or a sentence encoder folder)"
            )
        self.clip = None  # LoadedClip after setup()
        self.sentences = None  # CaptionEmbedder after setup()
        image = text = None
        if opts.model != NONE:
            spec = self._spec()
            if not spec.embedding_dim:
                raise ValueError(f"embed: the embedding size of {opts.model!r} is not in its config")
            image = (spec.embedding_dim, clip_embedding_info(spec, opts.model))
            if opts.text_model == "clip":
                text = image
        if opts.text_model not in (NONE, "clip"):
            text = self._sentence_info()
        self.outputs = EmbeddingOutputs(image, text, opts.hashes)
        self.columns = self.outputs.columns()
        self.wants_image_digest = opts.hashes

    def _spec(self):
        from mlmfilter.models.clip import inspect_clip

        return inspect_clip(self.options.model, self.options.allow_random_fallback)

    def _sentence_info(self) -> tuple[int, dict[str, Any]]:
        from mlmfilter.models.common import model_source
        from mlmfilter.models.sentence import MINILM, POOLING, sentence_dim, sentence_model_path

        name = self.options.text_model
        path = sentence_model_path(name)
        source = model_source(str(path))
        return sentence_dim(name), {
            "model": MINILM if name in ("minilm", MINILM) else name,
            "family": "sentence-transformers",
            "source": source,
            "pooling": POOLING,
            "random_weights": False,
        }

    def schema_fields(self) -> list[pa.Field]:
        return self.outputs.fields()

    @property
    def image_size(self) -> int | None:  # type: ignore[override]
        if self.options.model == NONE:
            return None  # the hashes need no more than the stage's smallest decode
        if self.clip is not None:
            return self.clip.image_size
        return self._spec().preprocessing.image_size

    def wants_gpu(self) -> bool:
        from mlmfilter.models.common import may_use_gpu

        return may_use_gpu(self.options.device)

    def setup(self) -> None:
        opts = self.options
        if opts.model != NONE:
            from mlmfilter.models.clip import load_clip

            self.clip = load_clip(
                opts.model, device=opts.device, dtype=opts.dtype, allow_random_fallback=opts.allow_random_fallback
            )
        if opts.text_model not in (NONE, "clip"):
            from mlmfilter.models.sentence import CaptionEmbedder

            path = None if opts.text_model in ("minilm",) else opts.text_model
            self.sentences = CaptionEmbedder(path, device=opts.device, batch_size=opts.batch_size)

    def close(self) -> None:
        self.clip = self.sentences = None
        self._ready = False

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        failures: dict[int, ScoreFailure] = {}
        for i, sample in enumerate(samples):
            if sample.image is None and (self.options.model != NONE or self.options.hashes):
                failures[i] = ScoreFailure(errors.MISSING_IMAGE, "no decoded image reached the embedder")
            elif not sample.caption and self.outputs.text is not None:
                failures[i] = ScoreFailure(errors.MISSING_CAPTION, "no caption")
        todo = [s for i, s in enumerate(samples) if i not in failures]
        rows = iter(self.embed(todo) if todo else [])
        return [failures[i] if i in failures else next(rows) for i in range(len(samples))]

    def embed(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        import torch

        image = text = None
        with torch.inference_mode():
            if self.clip is not None:
                image = unit_fp16(self.clip.image_embeddings(self._pixels(samples)))
                if self.options.text_model == "clip":
                    text = unit_fp16(self.clip.text_embeddings([s.caption for s in samples]))
        if self.sentences is not None:
            text = self.sentences.embed([s.caption for s in samples]).astype(np.float16)
        return self.outputs.rows(samples, image, text)

    def _pixels(self, samples: Sequence[Sample]):
        import torch

        from mlmfilter.images.pixels import to_pixel_values

        clip, pre = self.clip, self.clip.preprocessing
        return to_pixel_values(
            [s.image for s in samples],
            pre.crop_size,
            pre.mean,
            pre.std,
            crop=pre.center_crop,
            dtype=clip.dtype if clip.dtype == torch.bfloat16 else None,
        )

    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {**super().provenance(), "embeddings": self.outputs.provenance()}
        if self.options.model != NONE:
            from mlmfilter.models.clip import clip_provenance
            from mlmfilter.models.common import resolve_device, resolve_dtype

            if self.clip is not None:
                model_prov = dict(self.clip.provenance)
            else:
                device = resolve_device(self.options.device)
                model_prov = clip_provenance(self._spec(), device, resolve_dtype(self.options.dtype, device))
            prov.update(model_prov)
            prov["requested_dtype"] = self.options.dtype
        return prov
