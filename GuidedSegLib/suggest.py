"""Which unlabeled case to correct next: score each of a store's unlabeled images with a model
bundle and rank them, most informative first.

Scores, per organ, on the bundle's preprocessed grid (no restore to the scan's grid is needed):

- ``disagreement``: 1 - the soft Dice between network A's and network B's probability maps of
  the organ, 1 - 2 sum(a b) / (sum(a^2) + sum(b^2)): 0 when the two maps are identical, 1 when
  they do not overlap at all (0 when neither network gives the organ any probability). Soft,
  so that it grades small differences that the arg-max masks would hide. Needs a two-network
  bundle (CPS, GuidedNet); a one-network bundle falls back to ``entropy``, and says so.
- ``entropy``: the mean binary entropy (bits, 0..1) of the organ's probability (A and B averaged)
  over the voxels where the organ is more likely than not (probability >= 0.5): how sure the
  model is of the organ it finds. An organ found nowhere scores 0 (disagreement sees those).
- ``random``: a permutation drawn from ``seed`` (no inference; the baseline).

- ``cgmm``: where the bundle keeps GuidedNet's mixture (the default ``guidednet`` does: the
  moving averages of its class statistics), 1 - the soft Dice between each network's CGMM
  posterior G of the organ and its own probability map, averaged over the networks: how far the
  labeled data's feature statistics and the head disagree on the scan. A bundle without a mixture
  falls back to ``disagreement`` (or ``entropy``), and says so.

How organs combine: each organ's score lies in [0, 1] whatever the organ's size (a ratio or a
mean over the organ's own region, never a voxel count), and a case's score is the plain mean
over the bundle's organs. A small organ the networks disagree on weighs as much as the liver.

Speed: a single pass with windows that do not overlap (stride = patch, about an eighth of the
windows of the bundle's half-overlap stride), over the body box only, both networks on each
window. Scores are cached per case under ``<store>/.guidedseg-cache/suggest/<bundle hash>/``,
keyed by the bundle's hash (model.json + weights) and the image file's SHA-256, so a second run
with the same bundle on unchanged images runs no network.

The ranking goes to ``<store>/suggestions.json`` (written atomically under the store's lock).
Skipped cases stay in it, below every case not skipped (the most recently skipped last); a case
leaves the ranking only when it is labeled.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import GuidedSegError, StoreError
from .imageio import atomic_path
from .store import CaseStore
from .store import file_sha256

RANKING_FILE = "suggestions.json"
CACHE_FOLDER = Path(".guidedseg-cache") / "suggest"
STRATEGIES = ("disagreement", "entropy", "cgmm", "random")
SCORED = ("disagreement", "entropy", "cgmm")
CACHE_VERSION = 2
REGION_THRESHOLD = 0.5
COMBINE = "mean over organs of per-organ scores in [0, 1] (each organ weighs the same, whatever its size)"


@dataclass
class Suggestion:
    case_id: str
    score: float
    organs: dict[int, float] = field(default_factory=dict)  # organ value -> score
    skipped: float | None = None  # when it was last skipped (epoch seconds), None: not skipped
    cached: bool = False

    def to_dict(self) -> dict:
        return {"case": self.case_id, "score": round(self.score, 6),
                "organs": {str(v): round(s, 6) for v, s in self.organs.items()}, "skipped": self.skipped}


@dataclass
class Ranking:
    strategy: str
    labels: dict[int, str]
    items: list[Suggestion]
    note: str = ""
    inferred: int = 0  # cases the networks ran on (the rest came from the cache)


# ----------------------------------------------------------------------------------------------
# scores


def organ_scores(probabilities: np.ndarray, classes: int) -> dict[str, dict[int, float]]:
    """Both scores of every organ class index 1..K-1 from ``(N * K, z, y, x)`` probabilities
    (N networks stacked, as :meth:`Predictor.probabilities` with ``separate=True`` gives them)."""
    nets = probabilities.shape[0] // classes
    per_net = [probabilities[i * classes:(i + 1) * classes] for i in range(nets)]
    disagreement, entropy = {}, {}
    for k in range(1, classes):
        if nets >= 2:
            disagreement[k] = soft_disagreement(per_net[0][k], per_net[1][k])
        p = sum(q[k].astype(np.float32) for q in per_net) / nets
        region = p >= REGION_THRESHOLD
        if region.any():
            q = np.clip(p[region], 1e-6, 1 - 1e-6)
            entropy[k] = float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))
        else:
            entropy[k] = 0.0
    return {"disagreement": disagreement, "entropy": entropy}


def soft_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """1 - 2 sum(a b) / (sum(a^2) + sum(b^2)) of two probability maps (0 when both are empty)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    total = float(np.square(a).sum() + np.square(b).sum())
    return 0.0 if total == 0 else max(0.0, 1.0 - 2.0 * float((a * b).sum()) / total)


def posterior_scores(probabilities: np.ndarray, posteriors: np.ndarray, classes: int) -> dict[int, float]:
    """The ``cgmm`` score of every organ class 1..K-1: each network's probability map against its
    own CGMM posterior, both ``(N * K, z, y, x)``, averaged over the N networks."""
    nets = probabilities.shape[0] // classes
    return {k: float(np.mean([soft_disagreement(probabilities[i * classes + k], posteriors[i * classes + k])
                              for i in range(nets)])) for k in range(1, classes)}


def combine(scores: dict[int, float], organs: list[int] | None = None) -> float:
    """A case's score: the mean of its organs' scores (``organs``: a subset of values to count)."""
    chosen = [v for v in scores if organs is None or v in organs]
    return float(np.mean([scores[v] for v in chosen])) if chosen else 0.0


class CaseScorer:
    """Scores a store's cases with one bundle, through the cache; the networks load on first need."""

    def __init__(self, bundle, store: CaseStore, device: str = "cpu"):
        from .bundle import read_metadata
        from .lineage import bundle_hash

        self.bundle, self.store, self.device = Path(bundle), store, device
        self.metadata = read_metadata(self.bundle)
        self.hash = bundle_hash(self.bundle)
        self.cache = store.root / CACHE_FOLDER / self.hash[:16]
        self.predictor = None
        self.inferred = 0
        self._mixtures = None

    @property
    def mixtures(self) -> dict:
        """Network name -> the CGMM mixture the bundle keeps (empty: no ``cgmm`` score)."""
        if self._mixtures is None:
            from .cgmm import read_mixtures

            self._mixtures = read_mixtures(self.bundle)
        return self._mixtures

    @property
    def classes(self) -> list[int]:
        return [int(v) for v in self.metadata["labels"]]

    def _cached(self, case_id: str, image_sha: str) -> dict | None:
        path = self.cache / f"{case_id}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = record.get("version") == CACHE_VERSION and record.get("bundle") == self.hash and \
            record.get("image_sha256") == image_sha
        return record if ok else None

    def scores(self, case) -> tuple[dict[str, dict[int, float]], bool]:
        """(per-strategy organ scores keyed by label value, whether they came from the cache)."""
        image_sha = file_sha256(case.image)
        record = self._cached(case.case_id, image_sha)
        if record is None:
            began = time.monotonic()
            scores = self.infer(case.image)
            record = {"version": CACHE_VERSION, "bundle": self.hash, "image_sha256": image_sha,
                      "seconds": round(time.monotonic() - began, 2),
                      **{name: {str(self.classes[k]): s for k, s in values.items()} for name, values in scores.items()}}
            with atomic_path(self.cache / f"{case.case_id}.json") as tmp:
                tmp.write_text(json.dumps(record))
            cached = False
        else:
            cached = True
        return {name: {int(v): float(s) for v, s in record[name].items()} for name in SCORED if name in record}, cached

    def infer(self, image_path: Path) -> dict[str, dict[int, float]]:
        """Run the networks once over the image (fast pass) and score it; counted in ``inferred``."""
        import SimpleITK as sitk

        from .imageio import read_image
        from .inference import Predictor
        from .preprocessing import preprocess

        if self.predictor is None:
            self.predictor = Predictor(self.bundle, self.device, ensemble=True)
            self.predictor.stride = self.predictor.patch  # windows side by side: the coarse, fast pass
        prepared = preprocess(read_image(image_path), self.predictor.plan)
        volume = sitk.GetArrayFromImage(prepared.image)
        k = len(self.classes)
        names = self.metadata["networks"]
        if not all(name in self.mixtures for name in names):
            probabilities = self.predictor.probabilities(volume, separate=True)
            self.inferred += 1
            return organ_scores(probabilities, k)
        head = posterior_head([self.mixtures[name] for name in names], self.predictor.device)
        stacked = self.predictor.probabilities(volume, separate=True, head=head)
        self.inferred += 1
        pairs = stacked.reshape(len(names), 2, k, *stacked.shape[1:])  # (N, [P, G], K, z, y, x)
        probabilities = pairs[:, 0].reshape(-1, *stacked.shape[1:])
        posteriors = pairs[:, 1].reshape(-1, *stacked.shape[1:])
        return {**organ_scores(probabilities, k), "cgmm": posterior_scores(probabilities, posteriors, k)}


def posterior_head(mixtures: list, device):
    """A :class:`Predictor` head giving network i's softmax and its CGMM posterior under
    ``mixtures[i]`` (``(B, 2K, *patch)``), the posterior brought onto the logits' grid where the
    features are coarser."""
    import torch
    from torch.nn import functional as F

    from .cgmm import CGMMParameters, log_posterior

    placed = [CGMMParameters(*(t.to(device) for t in (m.mean, m.var, m.log_mixing, m.present))) for m in mixtures]

    def head(i: int, logits, features):
        probabilities = torch.softmax(logits.float(), 1)
        g = log_posterior(features.float(), placed[i]).exp()
        if g.shape[2:] != probabilities.shape[2:]:
            g = F.interpolate(g, size=probabilities.shape[2:], mode="trilinear", align_corners=False)
        return torch.cat([probabilities, g], 1)

    return head


# ----------------------------------------------------------------------------------------------
# the ranking file


def ranking_path(store_root) -> Path:
    return Path(store_root) / RANKING_FILE


def read_ranking(store_root) -> dict:
    """The saved ranking (an empty one when there is none yet)."""
    path = ranking_path(store_root)
    if not path.is_file():
        return {"ranking": [], "skipped": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StoreError(store_root, f"{RANKING_FILE} cannot be read ({error}); run 'guidedseg suggest' again") from None
    data.setdefault("ranking", [])
    data.setdefault("skipped", {})
    return data


def order(items: list[Suggestion]) -> list[Suggestion]:
    """Cases not skipped first, by score (highest first, then id); skipped ones after them, the
    longest-ago skipped first."""
    fresh = sorted((s for s in items if s.skipped is None), key=lambda s: (-s.score, s.case_id))
    skipped = sorted((s for s in items if s.skipped is not None), key=lambda s: (s.skipped, -s.score, s.case_id))
    return fresh + skipped


def queue(store: CaseStore) -> list[dict]:
    """The saved ranking's entries whose case is still unlabeled, in ranking order."""
    pool = {c.case_id for c in store.cases("unlabeled")}
    return [entry for entry in read_ranking(store.root)["ranking"] if entry.get("case") in pool]


def _write(store: CaseStore, data: dict, timeout: float = 60.0) -> None:
    with store.lock(timeout), atomic_path(ranking_path(store.root)) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _check_unlocked(store: CaseStore) -> None:
    try:
        with store.lock(timeout=1.0):
            pass
    except StoreError:
        raise StoreError(store.root, "is locked by another writer (an export, ingest or suggest in progress); "
                                     "try again when it is done; nothing was written") from None


def skip_case(store_root, case_id: str) -> list[dict]:
    """Move ``case_id`` to the bottom of the saved ranking (it stays in it); the new queue."""
    store = CaseStore(store_root)
    if case_id not in {c.case_id for c in store.cases("unlabeled")}:
        raise StoreError(store.root, f"case {case_id!r} is not an unlabeled case of the store; only those are queued")
    _check_unlocked(store)
    data = read_ranking(store.root)
    when = time.time()
    data["skipped"][case_id] = when
    items = [Suggestion(e["case"], float(e.get("score", 0.0)), {int(v): s for v, s in (e.get("organs") or {}).items()},
                        data["skipped"].get(e["case"])) for e in data["ranking"]]
    if case_id not in {s.case_id for s in items}:
        items.append(Suggestion(case_id, 0.0, {}, when))
    data["ranking"] = [s.to_dict() for s in order(items)]
    _write(store, data)
    return queue(store)


# ----------------------------------------------------------------------------------------------


def suggest(bundle, store_root, strategy: str = "disagreement", seed: int = 0, device: str = "cpu",
            reporter=None, organs: list[int] | None = None, scorer: CaseScorer | None = None) -> Ranking:
    """Rank the store's unlabeled cases and save the ranking beside dataset.json.

    Refused, with nothing written: an unknown strategy, a store locked by another writer, a
    store with no unlabeled case, a bundle that cannot be read (or of a newer format).
    """
    from .progress import Reporter

    if strategy not in STRATEGIES:
        raise GuidedSegError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    report = reporter or Reporter("none")
    store = CaseStore(store_root)
    _check_unlocked(store)
    pool = store.cases("unlabeled")
    if not pool:
        raise StoreError(store.root, "has no unlabeled case to rank: every training case is labeled (add scans "
                                     "with 'guidedseg store add'); nothing was written")
    saved = read_ranking(store.root)
    skipped = {cid: t for cid, t in saved["skipped"].items() if cid in {c.case_id for c in pool}}
    note, labels, inferred = "", store.labels, 0
    items = []
    if strategy == "random":
        scores = np.random.default_rng(seed).permutation(len(pool))  # sorted by id first: stable across runs
        by_id = sorted(pool, key=lambda c: c.case_id)
        items = [Suggestion(c.case_id, float(s) / max(1, len(pool) - 1), {}, skipped.get(c.case_id))
                 for c, s in zip(by_id, scores)]
    else:
        scorer = scorer or CaseScorer(bundle, store, device)
        labels = {int(v): n for v, n in scorer.metadata["labels"].items()}
        if strategy == "cgmm" and not scorer.mixtures:
            fallback = "disagreement" if len(scorer.metadata.get("networks", [])) >= 2 else "entropy"
            note = (f"{bundle}: a {scorer.metadata.get('method')} bundle keeps no CGMM mixture to compute the "
                    f"posterior from (only the default guidednet keeps one); ranked by {fallback} instead")
            report.message(f"note: {note}")
            strategy = fallback
        if strategy == "disagreement" and len(scorer.metadata.get("networks", [])) < 2:
            note = (f"{bundle}: a one-network ({scorer.metadata.get('method')}) bundle has no second network to "
                    "disagree with; ranked by entropy instead")
            report.message(f"note: {note}")
            strategy = "entropy"
        report.start_bar(0, len(pool), "ranking", "case")
        for index, case in enumerate(pool):
            report.stage("suggest", index, len(pool), case=case.case_id)
            scores, cached = scorer.scores(case)
            chosen = scores[strategy]
            items.append(Suggestion(case.case_id, combine(chosen, organs), chosen, skipped.get(case.case_id), cached))
            report.set_bar(index + 1, case=case.case_id)
        report.close()
        inferred = scorer.inferred
    ranked = order(items)
    data = {"format": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bundle": str(Path(bundle).resolve()) if bundle else None, "strategy": strategy, "seed": seed,
            "combine": COMBINE, "note": note, "ranking": [s.to_dict() for s in ranked], "skipped": skipped}
    _write(store, data)
    report.stage("suggest", len(pool), len(pool))
    return Ranking(strategy, labels, ranked, note, inferred)


def format_table(ranking: Ranking, top: int | None = None) -> str:
    """Rank, case, score and each organ's score (columns headed by the organs' names)."""
    organs = [v for v in sorted(ranking.labels) if v != 0]
    shown = ranking.items[:top] if top else ranking.items
    names = [ranking.labels[v][:10] for v in organs] if ranking.strategy != "random" else []
    width = max([len(s.case_id) for s in shown] + [4])
    lines = [f"{'rank':>4}  {'case':<{width}}  {'score':>6}  " + "  ".join(f"{n:>10}" for n in names)]
    for rank, item in enumerate(shown, start=1):
        cells = "  ".join(f"{item.organs.get(v, float('nan')):>10.3f}" for v in organs) if names else ""
        flag = "  (skipped)" if item.skipped is not None else ""
        lines.append(f"{rank:>4}  {item.case_id:<{width}}  {item.score:>6.3f}  {cells}{flag}")
    lines.append(f"strategy {ranking.strategy}; case score = {COMBINE if names else 'a seeded random draw'}")
    return "\n".join(lines)
