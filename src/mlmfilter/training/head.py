"""A distilled head: judge metrics predicted from a pair's embeddings at the cost of a matrix product.

Features: the image and text embeddings (L2-normalised, as the run keeps them) and, when both have
the same size, their element-wise product (where image-text agreement lives for a CLIP pair);
standardised with the training set's mean and spread. Two forms: ridge regression (one matrix
product) or a 2-layer MLP (ReLU hidden layer). Predictions are in the judge's units, clipped to
the range the judge's metrics have seen in training.

A head is a folder: ``head.safetensors`` (the arrays, no pickle) and ``head.json`` (metrics,
features, form, and its training provenance: which run, which stages, which sample, which encoder,
held-out agreement, warnings). :meth:`DistilledHead.load` reads it back with numpy only; the
``distilled`` scorer (``score --scorer distilled --model HEAD``) runs the recorded encoder, then the head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HEAD_FILE, INFO_FILE = "head.safetensors", "head.json"
FORMAT = "mlmfilter-distilled-head/1"
COLUMN_PREFIX = "distilled_"


def feature_names(modalities: list[str], product: bool) -> list[str]:
    return list(modalities) + (["image*text"] if product else [])


def build_features(vectors: dict[str, np.ndarray], modalities: list[str], product: bool) -> np.ndarray:
    """The feature matrix of rows' embeddings: the modalities side by side, then their product."""
    parts = [np.asarray(vectors[m], dtype=np.float32) for m in modalities]
    if product:
        parts.append(parts[0] * parts[1])
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


@dataclass
class DistilledHead:
    metrics: list[str]
    modalities: list[str]  # which embeddings it reads, in feature order
    product: bool  # image * text appended
    form: str  # "ridge" | "mlp"
    arrays: dict[str, np.ndarray]  # mean, scale, then W/b (ridge) or W1/b1/W2/b2 (mlp), y_mean/y_scale
    info: dict[str, Any] = field(default_factory=dict)  # provenance: training, embeddings, evaluation, warnings

    @property
    def columns(self) -> list[str]:
        return [COLUMN_PREFIX + m for m in self.metrics]

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        z = (np.asarray(x, dtype=np.float32) - a["mean"]) / a["scale"]
        if self.form == "ridge":
            y = z @ a["W"] + a["b"]
        else:
            y = np.maximum(z @ a["W1"] + a["b1"], 0.0) @ a["W2"] + a["b2"]
        y = y * a["y_scale"] + a["y_mean"]
        return np.clip(y, a["y_min"], a["y_max"]).astype(np.float32)

    def predict(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """(n, metrics) predictions from each modality's (n, d) embeddings."""
        return self.predict_features(build_features(vectors, self.modalities, self.product))

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.arrays[name], dtype=np.float32).tobytes())
        digest.update(json.dumps([self.metrics, self.modalities, self.product, self.form]).encode())
        return digest.hexdigest()[:24]

    # -- on disk ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save as save_arrays

        from mlmfilter.io.writers import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.arrays.items()}
        atomic_write(folder / HEAD_FILE, save_arrays(arrays))
        record = {
            "format": FORMAT,
            "metrics": self.metrics,
            "columns": self.columns,
            "modalities": self.modalities,
            "product": self.product,
            "form": self.form,
            "fingerprint": self.fingerprint(),
            **self.info,
        }
        atomic_write(folder / INFO_FILE, (json.dumps(record, indent=2, default=str) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "DistilledHead":
        from safetensors.numpy import load_file

        folder = Path(folder).expanduser()
        if not (folder / INFO_FILE).is_file() or not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a distilled head ({INFO_FILE} + {HEAD_FILE}); make one with `mlmfilter distill RUN`"
            )
        record = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"{folder}: unknown head format {record.get('format')!r} (this mlmfilter reads {FORMAT})")
        core = ("format", "metrics", "columns", "modalities", "product", "form", "fingerprint")
        head = cls(
            metrics=list(record["metrics"]),
            modalities=list(record["modalities"]),
            product=bool(record["product"]),
            form=record["form"],
            arrays=dict(load_file(str(folder / HEAD_FILE))),
            info={k: v for k, v in record.items() if k not in core},
        )
        if head.fingerprint() != record.get("fingerprint"):
            raise ValueError(f"{folder}: {HEAD_FILE} does not match {INFO_FILE} (fingerprint differs)")
        return head

    @property
    def warnings(self) -> list[str]:
        return list(self.info.get("warnings", []))


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    metrics: list[str],
    modalities: list[str],
    product: bool,
    form: str = "ridge",
    seed: int = 0,
    hidden: int = 256,
) -> DistilledHead:
    """Fit the head on features ``x`` (n, F) and judge scores ``y`` (n, metrics): ridge with its
    penalty chosen by leave-one-out (scikit-learn's RidgeCV), or an MLP with early stopping."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"mlmfilter distill fits its heads with scikit-learn: pip install 'mlmfilter[distill]' ({exc})"
        ) from exc
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    y_mean, y_scale = y.mean(axis=0), np.maximum(y.std(axis=0), 1e-6)
    t = (y - y_mean) / y_scale
    arrays: dict[str, np.ndarray] = {
        "mean": mean,
        "scale": scale,
        "y_mean": y_mean,
        "y_scale": y_scale,
        "y_min": y.min(axis=0),
        "y_max": y.max(axis=0),
    }
    info: dict[str, Any] = {}
    if form == "ridge":
        from sklearn.linear_model import RidgeCV

        alphas = np.logspace(-1, 5, 13)
        model = RidgeCV(alphas=alphas).fit(z, t)
        arrays["W"] = np.asarray(model.coef_, dtype=np.float32).reshape(len(metrics), -1).T
        arrays["b"] = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float32))
        info["ridge_alpha"] = float(model.alpha_)
    elif form == "mlp":
        from sklearn.neural_network import MLPRegressor

        model = MLPRegressor(
            hidden_layer_sizes=(hidden,),
            alpha=1e-3,
            early_stopping=len(z) >= 50,
            max_iter=300,
            random_state=seed,
        ).fit(z, t if len(metrics) > 1 else t[:, 0])
        arrays["W1"], arrays["W2"] = (np.asarray(w, dtype=np.float32) for w in model.coefs_)
        arrays["b1"], arrays["b2"] = (np.asarray(b, dtype=np.float32) for b in model.intercepts_)
        info["mlp"] = {"hidden": hidden, "iterations": int(model.n_iter_)}
    else:
        raise ValueError(f"unknown head form {form!r}: ridge or mlp")
    return DistilledHead(metrics, modalities, product, form, arrays, {"fit": info})
