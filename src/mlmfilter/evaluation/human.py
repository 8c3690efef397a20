"""Loaders for the standard caption-judgement sets, one class per published format.

Each loader turns its files into a :class:`JudgementSet`: one :class:`Judgement` (image file,
candidate caption, human rating) per rating, plus what the protocol dropped and why. The
aggregations follow the CLIPScore evaluation code (Hessel et al. 2021, appendix A), whose figures
the literature compares against:

- Flickr8K-Expert (``ExpertAnnotations.txt``: ``image, IMAGE#N, e1, e2, e3``; scores 1-4):
  the three expert scores are **not averaged**: each becomes its own judgement (flattened, so a
  pair counts three times), and Kendall tau-c over all of them is the headline figure. A candidate
  caption that is one of the query image's own reference captions (compared as text) is dropped,
  as in SPICE and CLIPScore (``drop_reference_captions=False`` keeps them).
- Flickr8K-CrowdFlower (``CrowdFlowerAnnotations.txt``: ``image, IMAGE#N, fraction_yes, n_yes, n_no``):
  one judgement per row, rated by the fraction of "yes" answers; headline Kendall tau-b; no row dropped.
- CLIPScore-style JSON (``flickr8k.json``, ``crowdflower_flickr8k.json``, Composite's json):
  ``{key: {"image_path": ..., "human_judgement": [{"caption", "rating", "image_path"?}, ...]}}``, or
  a plain list of ``{"image_path", "caption", "rating"}``; one judgement per entry, NaN ratings dropped.

Captions of the Flickr8K text files come from ``Flickr8k.token.txt`` (``IMAGE#N \\t caption``),
by default the one beside the annotation file. Candidates are whitespace-normalised as the
CLIPScore code does (``" ".join(caption.split())``).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_FILE = "Flickr8k.token.txt"


@dataclass(frozen=True)
class Judgement:
    image: str  # image path relative to the images folder
    caption: str
    rating: float
    caption_id: str = ""  # IMAGE#N where the format has one
    rater: str = ""  # expert1/2/3 for the flattened Expert scores


@dataclass
class JudgementSet:
    benchmark: str
    source: str  # the annotation file
    judgements: list[Judgement]
    headline_tau: str  # "c" or "b": the Kendall variant the literature reports on this set
    aggregation: str  # how a rating is formed, in words (goes into the output)
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out by the protocol, by reason

    @property
    def images(self) -> list[str]:
        return sorted({j.image for j in self.judgements})


class Flickr8kCaptions:
    """``Flickr8k.token.txt``: caption id (``IMAGE#N``) -> caption."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, str]:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"caption file {self.path} not found (Flickr8k.token.txt: 'IMAGE#N<TAB>caption' lines; pass --captions)"
            )
        captions = {}
        for number, fields in _tsv_rows(self.path, 2):
            captions[fields[0]] = fields[1]
        return captions


class ExpertAnnotations:
    """Flickr8K-Expert: three expert scores (1-4) per pair, flattened into three judgements."""

    benchmark = "flickr8k-expert"

    def __init__(self, path: str | Path, captions: str | Path | None = None, drop_reference_captions: bool = True):
        self.path = Path(path)
        self.captions = Path(captions) if captions else self.path.parent / TOKEN_FILE
        self.drop_reference_captions = drop_reference_captions

    def load(self) -> JudgementSet:
        _require_annotations(self.path)  # named first: a missing caption file is the lesser news
        captions = Flickr8kCaptions(self.captions).load()
        references = _references_by_image(captions)
        judgements, dropped = [], Counter()
        for number, (image, caption_id, *ratings) in _tsv_rows(self.path, 5):
            caption = _caption(captions, caption_id, self.path, number)
            if self.drop_reference_captions and caption in references.get(image, ()):
                dropped["candidate_is_a_reference_caption"] += 1
                continue
            for rater, rating in enumerate(ratings, start=1):
                value = _rating(rating, self.path, number)
                if not 1 <= value <= 4:
                    raise ValueError(f"{self.path}:{number}: expert score {rating!r} outside 1-4")
                judgements.append(Judgement(image, _normalise(caption), value, caption_id, f"expert{rater}"))
        aggregation = (
            "each of the 3 expert scores (1-4) is one judgement (flattened, not averaged), as in CLIPScore; "
            + (
                "candidates that are one of the image's own reference captions are dropped"
                if self.drop_reference_captions
                else "reference captions kept"
            )
        )
        return JudgementSet(self.benchmark, str(self.path), judgements, "c", aggregation, dict(dropped))


class CrowdFlowerAnnotations:
    """Flickr8K-CrowdFlower: yes/no crowd answers per pair, rated by the fraction of yes."""

    benchmark = "flickr8k-crowdflower"

    def __init__(self, path: str | Path, captions: str | Path | None = None):
        self.path = Path(path)
        self.captions = Path(captions) if captions else self.path.parent / TOKEN_FILE

    def load(self) -> JudgementSet:
        _require_annotations(self.path)
        captions = Flickr8kCaptions(self.captions).load()
        judgements = []
        for number, (image, caption_id, fraction, n_yes, n_no) in _tsv_rows(self.path, 5):
            caption = _caption(captions, caption_id, self.path, number)
            value = _rating(fraction, self.path, number)
            yes, no = int(_rating(n_yes, self.path, number)), int(_rating(n_no, self.path, number))
            if yes + no == 0 or abs(value - yes / (yes + no)) > 1e-4:
                raise ValueError(f"{self.path}:{number}: fraction {fraction} does not match {yes} yes / {no} no")
            judgements.append(Judgement(image, _normalise(caption), value, caption_id))
        aggregation = "fraction of 'yes' answers per pair (one judgement per row), as in CLIPScore"
        return JudgementSet(self.benchmark, str(self.path), judgements, "b", aggregation, {})


class ClipScoreJsonAnnotations:
    """The JSON that CLIPScore-style evaluation code reads (Flickr8K, CrowdFlower, Composite)."""

    benchmark = "clipscore-json"

    def __init__(self, path: str | Path, headline_tau: str = "c"):
        self.path = Path(path)
        self.headline_tau = headline_tau

    def load(self) -> JudgementSet:
        _require_annotations(self.path)
        try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the data
            data = json.loads(self.path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path} is not a JSON file: {exc}") from None
        except RecursionError:  # a hostile file nested thousands deep
            raise ValueError(f"{self.path} nests too deeply to be an annotation file") from None
        entries = list(_json_judgements(data, self.path))
        judgements, dropped = [], Counter()
        for where, image, item in entries:
            caption, rating = item.get("caption"), item.get("rating")
            numeric = isinstance(rating, (int, float)) and not isinstance(rating, bool)  # true is not a 1
            if not isinstance(caption, str) or not isinstance(image, str) or not numeric:
                raise ValueError(
                    f"{self.path}: {where} needs a string caption and image_path and a numeric rating "
                    f"(got rating {rating!r})"
                )
            if isinstance(rating, float) and math.isnan(rating):
                dropped["nan_rating"] += 1
                continue
            judgements.append(Judgement(image, _normalise(caption), float(rating), str(item.get("caption_id", ""))))
        aggregation = "one judgement per human_judgement entry, rated by its 'rating'; NaN ratings dropped"
        return JudgementSet(self.benchmark, str(self.path), judgements, self.headline_tau, aggregation, dict(dropped))


#: --benchmark name -> loader class
BENCHMARKS = {
    "flickr8k-expert": ExpertAnnotations,
    "flickr8k-crowdflower": CrowdFlowerAnnotations,
    "clipscore-json": ClipScoreJsonAnnotations,
    "composite": ClipScoreJsonAnnotations,
}


def load_benchmark(
    name: str, annotations: str | Path, captions: str | Path | None = None, drop_reference_captions: bool = True
) -> JudgementSet:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if name == "flickr8k-expert":
        return ExpertAnnotations(annotations, captions, drop_reference_captions).load()
    if name == "flickr8k-crowdflower":
        return CrowdFlowerAnnotations(annotations, captions).load()
    loaded = ClipScoreJsonAnnotations(annotations).load()
    loaded.benchmark = name
    return loaded


def _require_annotations(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")


def _tsv_rows(path: Path, n_fields: int):
    """(line number, fields) of a tab-separated file; a malformed line is a clear error, not a skip.
    A byte-order mark is not part of the first field (``utf-8-sig``)."""
    _require_annotations(path)
    with open(path, encoding="utf-8-sig") as fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != n_fields:
                raise ValueError(f"{path}:{number}: expected {n_fields} tab-separated fields, got {len(fields)}")
            yield number, fields


def _references_by_image(captions: dict[str, str]) -> dict[str, set[str]]:
    references: dict[str, set[str]] = defaultdict(set)
    for caption_id, caption in captions.items():
        references[caption_id.split("#", 1)[0]].add(caption)
    return references


def _caption(captions: dict[str, str], caption_id: str, path: Path, number: int) -> str:
    try:
        return captions[caption_id]
    except KeyError:
        raise ValueError(f"{path}:{number}: caption {caption_id!r} is not in the caption file") from None


def _rating(text: str, path: Path, number: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}:{number}: {text!r} is not a number") from None


def _json_judgements(data, path: Path):
    """(where, image path, judgement dict) for both JSON layouts."""
    if isinstance(data, dict):
        for key, entry in data.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("human_judgement"), list):
                raise ValueError(f"{path}: entry {key!r} has no 'human_judgement' list")
            for i, item in enumerate(entry["human_judgement"]):
                if not isinstance(item, dict):
                    raise ValueError(f"{path}: entry {key!r} judgement {i} is not an object")
                yield f"entry {key!r} judgement {i}", item.get("image_path", entry.get("image_path")), item
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: item {i} is not an object")
            yield f"item {i}", item.get("image_path"), item
    else:
        raise ValueError(f"{path}: expected an object of entries or a list of judgements")


def _normalise(caption: str) -> str:
    return " ".join(caption.split())
