"""Score predicted label maps against references: Dice, Jaccard, HD95 and ASD per case and organ.

Only (case, organ) pairs whose reference is annotated count: an organ nobody contoured in a
reference says nothing about the prediction there (a case store records each case's annotated
and checked-absent organs; a plain label file counts the organs present in it). Distances
(MONAI's Hausdorff 95th percentile and symmetric average surface distance, in mm, on each
organ's bounding box) need both masks non-empty; where one is empty they are left out and the
count shows it. The report folder holds ``metrics.csv`` (one row per pair), ``summary.md``,
``dice.png`` (mean Dice per organ with SD and n) and ``overlays/<case>.png``.

Prediction and reference labels are paired by name, never by value alone: a model's "liver"
(value 1) is not scored as another data set's value 1. Names the other side lacks are listed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputFileError
from .geometry import Grid
from .imageio import IMAGE_SUFFIXES, SEGMENTATION_SUFFIX, case_id_from_path, file_suffix, read_image, read_label_map
from .labels import label_colour, normalise_name
from .metrics import dice, jaccard

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm")


@dataclass
class PairScore:
    """The scores of one organ in one case."""

    case: str
    value: int
    organ: str
    dice: float
    jaccard: float
    hd95_mm: float  # NaN when the prediction or the reference is empty
    asd_mm: float
    reference_voxels: int
    predicted_voxels: int


def score_organs(prediction: np.ndarray, reference: np.ndarray, spacing_zyx, organs: dict[int, str],
                 case: str) -> list[PairScore]:
    """Scores of each organ value in ``organs`` for one case (arrays (z, y, x) on one grid)."""
    scores = []
    for value, name in organs.items():
        pred, ref = prediction == value, reference == value
        hd95 = asd = math.nan
        if pred.any() and ref.any():
            hd95, asd = surface_distances(pred, ref, spacing_zyx)
        scores.append(PairScore(case, int(value), name, dice(pred, ref), jaccard(pred, ref), hd95, asd,
                                int(ref.sum()), int(pred.sum())))
    return scores


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> tuple[float, float]:
    """(HD95, symmetric ASD) in mm of two non-empty masks, computed by MONAI on their joint box."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    either = pred | ref
    box = tuple(slice(max(0, i.min() - 1), i.max() + 2) for i in np.nonzero(either))
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)
    return float(hd95.item()), float(asd.item())


@dataclass
class EvaluationReport:
    scores: list[PairScore]
    labels: dict[int, str]  # organ value -> name (background excluded)
    left_out: dict[int, int] = field(default_factory=dict)  # organ -> cases whose reference lacks it
    cases: list[str] = field(default_factory=list)
    unmatched_reference: list[str] = field(default_factory=list)  # no prediction label of that name
    unmatched_prediction: list[str] = field(default_factory=list)  # not in the reference's label set

    def pairing_text(self) -> str:
        """Which organs were paired by name, and which names were left out on either side."""
        if self.unmatched_reference or self.unmatched_prediction:
            text = f"labels matched by name: {_names(self.labels.values())}"
        else:
            text = f"labels matched by name: all {len(self.labels)} organs"
        if self.unmatched_reference:
            text += (f"; not scored, no prediction label of that name: {_names(self.unmatched_reference)}")
        if self.unmatched_prediction:
            text += f"; prediction labels not in the reference, ignored: {_names(self.unmatched_prediction)}"
        return text

    def summary(self) -> dict[int, dict]:
        """Per organ: n, and mean / SD / n of each metric over the pairs where it is defined."""
        out = {}
        for value, name in self.labels.items():
            rows = [s for s in self.scores if s.value == value]
            entry = {"organ": name, "n": len(rows), "left_out": self.left_out.get(value, 0)}
            for metric in METRICS:
                values = [getattr(s, metric) for s in rows if not math.isnan(getattr(s, metric))]
                entry[metric] = (float(np.mean(values)) if values else math.nan,
                                 float(np.std(values)) if values else math.nan, len(values))
            out[value] = entry
        return out

    def markdown_summary(self) -> str:
        summary = self.summary()
        lines = [f"Scored {len(self.scores)} (case, organ) pairs over {len(self.cases)} cases; pairs whose "
                 "reference is not annotated are left out. Mean ± SD (n); distances only where both masks "
                 "are non-empty.", "", self.pairing_text() + ".", "",
                 "| organ | n | Dice | Jaccard | HD95 (mm) | ASD (mm) | left out |",
                 "|---|---:|---|---|---|---|---:|"]

        def cell(stat):
            mean, sd, n = stat
            return "-" if n == 0 else f"{mean:.3f} ± {sd:.3f}" + ("" if n == 0 else f" ({n})")

        for entry in summary.values():
            lines.append(f"| {entry['organ']} | {entry['n']} | " + " | ".join(cell(entry[m]) for m in METRICS)
                         + f" | {entry['left_out']} |")
        scored = [e for e in summary.values() if e["n"]]
        if scored:
            mean_dice = np.mean([e["dice"][0] for e in scored])
            lines.append(f"| **mean over organs** | {sum(e['n'] for e in scored)} | {mean_dice:.3f} | "
                         f"{np.mean([e['jaccard'][0] for e in scored]):.3f} | | | |")
        return "\n".join(lines)

    def case_table(self) -> str:
        lines = ["| case | organs scored | mean Dice |", "|---|---:|---:|"]
        for case in self.cases:
            rows = [s.dice for s in self.scores if s.case == case]
            lines.append(f"| {case} | {len(rows)} | {np.mean(rows):.3f} |" if rows else f"| {case} | 0 | - |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(PairScore.__dataclass_fields__))
        writer.writeheader()
        for score in self.scores:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(score).items()})
        return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# pairing files and labels


@dataclass
class Reference:
    case: str
    label: Path
    organs: tuple[int, ...] | None  # annotated (or checked-absent) values; None: those in the file
    image: Path | None = None


@dataclass
class Pairing:
    """Which prediction value means which reference organ, matched by name."""

    matched: dict[int, int]  # reference value -> prediction value
    reference_only: list[str]  # reference organs no prediction label is named after (not scored)
    prediction_only: list[str]  # prediction labels the reference does not have (ignored)


def pair_labels(reference: dict[int, str], prediction: dict[int, str], where: Path) -> Pairing:
    """Match label values by name (case, spaces, dashes and underscores ignored). Refuses, naming
    ``where``, a pairing with no name in common: its numbers would score one organ against another."""
    by_name = {normalise_name(n): v for v, n in prediction.items() if v != 0}
    matched = {r: by_name[normalise_name(n)] for r, n in reference.items() if normalise_name(n) in by_name}
    reference_only = [n for r, n in reference.items() if r not in matched]
    known = {normalise_name(n) for n in reference.values()}
    prediction_only = [n for v, n in prediction.items() if v != 0 and normalise_name(n) not in known]
    if not matched:
        raise InputFileError(where, f"has no label name in common with the reference: the prediction names "
                                    f"{_names(prediction.values())}, the reference {_names(reference.values())}; "
                                    "give --labels with the model bundle that wrote the predictions")
    return Pairing(matched, reference_only, prediction_only)


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"


def _is_generic(names: dict[int, str]) -> bool:
    """True for the names a plain label file without a label set gets (label_1, label_2, ...)."""
    return all(n == f"label_{v}" for v, n in names.items())


def evaluate_folders(pred: Path, ref: Path, output: Path, labels: Path | None = None, images: Path | None = None,
                     slices: int = 3, progress: Callable[[str], None] | None = None,
                     ref_labels: Path | None = None) -> EvaluationReport:
    """Score ``pred`` (file or folder) against ``ref`` (file, folder or case store) and write the
    report into the new folder ``output``.

    Prediction and reference labels are matched by name: the reference's from the store, from
    ``ref_labels`` (a dataset.json or store folder) or from the files (``.seg.nrrd`` segment
    names); the prediction's from ``labels`` (the bundle that wrote them, its model.json, or a
    dataset.json whose values they use) or from the files. Plain label files without names on
    both sides pair by value. Nothing is written unless every case is scored."""
    output = Path(output)
    if output.exists():
        raise InputFileError(output, "already exists; the report goes into a new folder (nothing is overwritten)")
    references, names = _references(Path(ref), ref_labels)
    prediction_names = _label_names(labels) if labels is not None else None
    predictions = _predictions(Path(pred), references)
    image_paths = _images(images, references)
    say = progress or (lambda text: None)
    scores, left_out, cases, pictures = [], {v: 0 for v in names}, [], {}
    reference_only: dict[str, None] = {}
    prediction_only: dict[str, None] = {}
    matched_values: set[int] = set()
    for index, reference in enumerate(references):
        say(f"[{index + 1}/{len(references)}] {reference.case}")
        ref_map = _checked(read_label_map(reference.label, label_names=names), reference.label, names)
        path = predictions[reference.case]
        named_file = file_suffix(path) == SEGMENTATION_SUFFIX
        if prediction_names is None and not named_file and not _is_generic(names):
            raise InputFileError(path, f"is a label file without label names, but the reference names its organs "
                                       f"({_names(names.values())}); give --labels with the model bundle that wrote "
                                       "it (or a dataset.json whose values it uses), or save it as .seg.nrrd")
        own = prediction_names if prediction_names is not None else None if named_file else names
        pred_map = read_label_map(path, label_names=own, reference=Grid.of(ref_map.image))
        own = {int(v): n for v, n in pred_map.names.items() if int(v) != 0}
        _checked(pred_map, path, own)
        pairing = pair_labels(names, own, path)
        reference_only.update(dict.fromkeys(pairing.reference_only))
        prediction_only.update(dict.fromkeys(pairing.prediction_only))
        matched_values |= set(pairing.matched)
        ref_array = sitk.GetArrayViewFromImage(ref_map.image)
        lut = np.zeros(max(own, default=0) + 1, dtype=ref_array.dtype)
        for ref_value, pred_value in pairing.matched.items():
            lut[pred_value] = ref_value
        pred_array = lut[sitk.GetArrayViewFromImage(pred_map.image)]  # in the reference's values
        organs = reference.organs if reference.organs is not None else tuple(ref_map.values_present())
        scored = {v: names[v] for v in pairing.matched if v in organs}
        for value in names:
            if value not in scored:
                left_out[value] += 1
        spacing = ref_map.image.GetSpacing()[::-1]
        case_scores = score_organs(pred_array, ref_array, spacing, scored, reference.case)
        scores += case_scores
        cases.append(reference.case)
        if slices > 0:
            image = read_image(image_paths[reference.case]) if reference.case in image_paths else None
            pictures[reference.case] = overlay_png(image, ref_array, pred_array, names, slices, reference.case,
                                                   {s.value: s.dice for s in case_scores})
    # Organs matched in no case are not part of the report; the summary names them instead.
    kept = {v: n for v, n in names.items() if v in matched_values}
    report = EvaluationReport(scores, kept, {v: left_out[v] for v in kept}, cases,
                              unmatched_reference=[n for n in reference_only if n not in kept.values()],
                              unmatched_prediction=list(prediction_only))
    say(report.pairing_text())
    _write_report(report, output, pictures)
    return report


def _references(ref: Path, labels: Path | None) -> tuple[list[Reference], dict[int, str]]:
    from .store import CaseStore

    if not ref.exists():
        raise InputFileError(ref, "does not exist")
    if ref.is_dir() and (ref / "dataset.json").is_file():
        if labels is not None:
            raise InputFileError(labels, f"--ref-labels is for a folder of label files; the store {ref} names "
                                         "its own labels")
        store = CaseStore(ref)
        refs = [Reference(c.case_id, c.label, tuple(store.annotated_labels(c)) + tuple(c.absent), c.image)
                for c in store.cases("test") if c.label is not None]
        if not refs:
            raise InputFileError(ref, "is a case store without labeled test cases to evaluate against")
        return refs, dict(store.organs)
    names = _label_names(labels) if labels is not None else None
    files = _image_files(ref) if ref.is_dir() else [ref]
    if not files:
        raise InputFileError(ref, "holds no label files (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha, .mhd)")
    store_root = labels if labels is not None and labels.is_dir() else labels.parent if labels else None
    store = CaseStore(store_root) if store_root is not None and (store_root / "dataset.json").is_file() else None
    refs = []
    for path in files:
        case = case_id_from_path(path)
        organs = None
        if store is not None and case in store and store.case(case).label is not None:
            known = store.case(case)
            organs = tuple(store.annotated_labels(known)) + tuple(known.absent)
        refs.append(Reference(case, path, organs))
    if names is None:  # the files' own names: segment names of .seg.nrrd files, label_<value> otherwise
        names, seen = {}, {}
        for reference in refs:
            for value, name in read_label_map(reference.label).names.items():
                if normalise_name(name) not in seen:
                    value = value if value not in names else max(names) + 1
                    names[value] = seen[normalise_name(name)] = name
    return refs, {int(v): n for v, n in sorted(names.items()) if int(v) != 0}


def _checked(label, path: Path, names: dict[int, str]):
    unknown = sorted(set(label.values_present()) - set(names))
    if unknown:
        raise InputFileError(path, f"holds label values {unknown} outside the label set {names}")
    return label


def _label_names(path: Path) -> dict[int, str]:
    file = path
    if path.is_dir():
        file = path / "model.json" if (path / "model.json").is_file() else path / "dataset.json"
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
        return {int(v): str(n) for v, n in data["labels"].items() if int(v) != 0}
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise InputFileError(file, f"has no readable 'labels' mapping of values to names ({error})") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith((SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES)))


def _predictions(pred: Path, references: list[Reference]) -> dict[str, Path]:
    if not pred.exists():
        raise InputFileError(pred, "does not exist")
    if pred.is_file():
        if len(references) != 1:
            raise InputFileError(pred, f"is one file, but there are {len(references)} references: give a folder")
        return {references[0].case: pred}
    found = {case_id_from_path(p): p for p in _image_files(pred)}
    missing = [r.case for r in references if r.case not in found]
    if missing:
        raise InputFileError(pred, f"has no prediction for {len(missing)} reference case(s): {', '.join(missing[:5])}"
                                   + (" ..." if len(missing) > 5 else "") + " (matched by file name)")
    return found


def _images(images: Path | None, references: list[Reference]) -> dict[str, Path]:
    found = {r.case: r.image for r in references if r.image is not None}
    if images is not None:
        if images.is_file():
            found[references[0].case] = images
        else:
            found.update({case_id_from_path(p): p for p in _image_files(images)})
    return found


# ----------------------------------------------------------------------------------------------
# pictures and files


def overlay_png(image: sitk.Image | None, reference: np.ndarray, prediction: np.ndarray, names: dict[int, str],
                slices: int, case: str, dice_scores: dict[int, float] | None = None) -> bytes:
    """PNG of ``slices`` axial slices through the reference's organs: reference on top,
    prediction below, each organ in its colour over the scan (or a blank field), with a legend
    of the organs shown and their Dice in this case (``dice_scores``: value -> Dice of the
    scored organs; the others are marked not scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dice_scores = dice_scores or {}
    foreground = np.flatnonzero((reference > 0).any(axis=(1, 2)) | (prediction > 0).any(axis=(1, 2)))
    if foreground.size == 0:
        foreground = np.arange(reference.shape[0])
    picks = np.unique(np.percentile(foreground, np.linspace(20, 80, slices)).round().astype(int))
    scan = sitk.GetArrayViewFromImage(image) if image is not None else None
    lut = np.zeros((max(max(names, default=0), int(reference.max()), int(prediction.max())) + 1, 4))
    for value, name in names.items():
        lut[value] = (*label_colour(name), 0.55)
    figure, axes = plt.subplots(2, len(picks), figsize=(3.2 * len(picks) + 2.6, 6.4), squeeze=False)
    for column, z in enumerate(picks):
        for row, (title, labels) in enumerate((("reference", reference), ("prediction", prediction))):
            ax = axes[row, column]
            if scan is not None and scan.shape == reference.shape:
                low, high = np.percentile(scan[z], (1, 99))
                ax.imshow(scan[z], cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            else:
                ax.imshow(np.zeros(reference.shape[1:]), cmap="gray", vmin=0, vmax=1)
            ax.imshow(lut[labels[z]])
            ax.set_title(f"{title}, slice {z}", fontsize=9)
            ax.axis("off")
    shown = sorted(set(np.unique(reference[picks])) | set(np.unique(prediction[picks])) | set(dice_scores))
    handles = [Patch(facecolor=label_colour(names[v]), edgecolor="black", linewidth=0.5,
                     label=f"{names[v]}  " + (f"Dice {dice_scores[v]:.3f}" if v in dice_scores else "not scored"))
               for v in shown if v in names]
    if handles:
        figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    mean = ""
    if dice_scores:
        mean = f"  (mean Dice {np.mean(list(dice_scores.values())):.3f} over {len(dice_scores)} organs)"
    figure.suptitle(case + mean)
    figure.tight_layout(rect=(0, 0, 1 - 2.6 / (3.2 * len(picks) + 2.6), 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def dice_chart_png(report: EvaluationReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [e for e in report.summary().values() if e["n"]]
    figure, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(summary) + 1.5), 3.8))
    x = np.arange(len(summary))
    means = [e["dice"][0] for e in summary]
    ax.bar(x, means, yerr=[e["dice"][1] for e in summary], capsize=3,
           color=[label_colour(e["organ"]) for e in summary], edgecolor="black", linewidth=0.5)
    for i, entry in enumerate(summary):
        ax.text(i, 0.02, f"n={entry['n']}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, [e["organ"] for e in summary], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (mean ± SD)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _write_report(report: EvaluationReport, output: Path, pictures: dict[str, bytes]) -> None:
    """Everything goes into a temporary folder beside ``output``, renamed into place at the end."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{secrets.token_hex(4)}-{output.name}")
    tmp.mkdir()
    try:
        (tmp / "metrics.csv").write_text(report.csv_text(), encoding="utf-8")
        (tmp / "summary.md").write_text("# Evaluation\n\n" + report.markdown_summary() + "\n\n## Cases\n\n"
                                        + report.case_table() + "\n", encoding="utf-8")
        if report.scores:
            (tmp / "dice.png").write_bytes(dice_chart_png(report))
        if pictures:
            (tmp / "overlays").mkdir()
            for case, png in pictures.items():
                (tmp / "overlays" / f"{case}.png").write_bytes(png)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
