"""The annotation loop in the panel, in plain Python with MRML (no Qt): the queue of unlabeled
cases (the ranking ``guidedseg suggest`` saved beside dataset.json), loading the next case,
re-opening a labeled one with its latest label version, the subset of organs to segment, when
an automatic fine-tune is due, and the new model's validation Dice beside its parent's.
"""

from __future__ import annotations

import json

from GuidedSegLib import suggest as ranking
from GuidedSegLib.imageio import read_image
from GuidedSegLib.labels import label_colour, normalise_name
from GuidedSegLib.store import Case, CaseStore

from . import nodes
from .export import DRAFT_LABELS_ATTRIBUTE


def queue(store: CaseStore) -> list[str]:
    """Unlabeled case ids in the order to correct them: the saved ranking, then any unlabeled case
    added since it was made (by id), then the skipped cases (longest-ago skipped first)."""
    entries = ranking.queue(store)
    fresh = [e["case"] for e in entries if e.get("skipped") is None]
    skipped = [e["case"] for e in entries if e.get("skipped") is not None]
    rest = sorted(c.case_id for c in store.cases("unlabeled") if c.case_id not in set(fresh + skipped))
    return fresh + rest + skipped


def empty_queue_text(store: CaseStore) -> str:
    labeled = len(store.cases("labeled"))
    return (f"The queue is empty: all {labeled} training cases of {store.name} are labeled. Add unlabeled scans to "
            "the store (guidedseg store add) to go on, or re-open a labeled case to correct it again.")


def load_case(case: Case, store: CaseStore, scene):
    """The case's image as a new volume node that the export knows as this case of this store."""
    volume = nodes.image_to_volume(read_image(case.image), scene, scene.GenerateUniqueName(case.case_id))
    volume.SetAttribute(nodes.CASE_ATTRIBUTE, case.case_id)
    volume.SetAttribute(nodes.STORE_ATTRIBUTE, str(store.root))
    return volume


def reopen(case_id: str, store: CaseStore, scene, segmentations_logic):
    """A labeled case with its latest label version: (volume node, segmentation node). The label
    is also the segmentation's draft, so the export counts what the annotator changes now."""
    case = store.case(case_id)
    if case.kind != "labeled":
        raise ValueError(f"case {case_id} is {case.kind}, not labeled; only labeled cases are re-opened")
    volume = load_case(case, store, scene)
    label = store.read_label(case)
    organs = store.organs
    node = nodes.label_to_segmentation(
        label.image, organs, {v: label_colour(n) for v, n in organs.items()}, volume, scene, segmentations_logic,
        node_name=scene.GenerateUniqueName(f"{case_id} label v{case.label_version}"))
    import SimpleITK as sitk

    nodes.set_draft(node, sitk.GetArrayFromImage(label.image), volume, scene)
    node.SetAttribute(DRAFT_LABELS_ATTRIBUTE, json.dumps({str(v): n for v, n in store.labels.items()}))
    return volume, node


def parse_organs(text: str, labels: dict[int, str]) -> list[int] | None:
    """The organ values named in ``text`` (comma-separated names or values; empty: all, None).
    ValueError naming an unknown organ and the known ones."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items:
        return None
    by_name = {normalise_name(n): v for v, n in labels.items()}
    values = []
    for item in items:
        value = int(item) if item.isdigit() and int(item) in labels else by_name.get(normalise_name(item))
        if value is None:
            raise ValueError(f"{item!r} is not an organ of the model ({', '.join(labels.values())})")
        values.append(value)
    return values


def keep_organs(segmentation_node, names: list[str]) -> list[str]:
    """Remove the segments whose name is not in ``names`` (the organs chosen to segment); the
    names removed."""
    wanted = {normalise_name(n) for n in names}
    removed = []
    segmentation = segmentation_node.GetSegmentation()
    for segment_id, name in nodes.segments(segmentation_node):
        if normalise_name(name) not in wanted:
            segmentation.RemoveSegment(segment_id)
            removed.append(name)
    return removed


def fine_tune_due(labeled_now: int, labeled_at_last: int, every: int) -> bool:
    """An automatic fine-tune is due after every ``every`` new labeled cases (0: never)."""
    return every > 0 and labeled_now - labeled_at_last >= every


def comparison_text(new, parent) -> str:
    """The new model's validation Dice beside its parent's (ModelInfo objects), per organ too."""
    def mean(model):
        return f"{model.mean_dice:.3f}" if model is not None and model.mean_dice is not None else "-"

    lines = [f"New model {new.name}: validation mean Dice {mean(new)} (parent {parent.name if parent else '?'}: "
             f"{mean(parent)})"]
    for value, name in sorted(new.labels.items()):
        now = new.organ_dice.get(value)
        before = parent.organ_dice.get(value) if parent is not None else None
        if now is not None or before is not None:
            lines.append(f"  {name}: {now if now is None else f'{now:.2f}'} (was "
                         f"{before if before is None else f'{before:.2f}'})")
    if new.mean_dice is None:
        lines.append("No validation split (fewer than 10 labeled cases): the final weights were kept.")
    return "\n".join(lines)
