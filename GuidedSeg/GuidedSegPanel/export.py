"""Export corrected labels into a case store: which organs count as annotated, and the write.

What is recorded (methods.md section 3: organs outside a case's annotated set are unknown, not
background):

- an organ whose segment the annotator **edited** (its voxels differ from the model's draft
  written at Segment time) counts as annotated; if they erased it completely, as checked absent;
- an organ the annotator **ticks as checked** in the export dialog counts too: annotated when its
  segment holds voxels, absent when it is empty or has no segment;
- every other organ stays **unannotated**: its voxels are left out of the stored label, so a
  model's unchecked guess never becomes ground truth.

The draft is kept beside the segmentation node, as a hidden label map node it references
(``nodes.set_draft``). Without a draft (the segmentation was not made by Segment, or its draft
node was deleted) nothing counts as edited: the annotator ticks every organ they reviewed, so a
model's unreviewed output never enters a store as annotated.

Where the label goes: when the volume is a case of the store (it was loaded from the store's
image file, or exported before), a new label version of that case (``CaseStore.ingest_label``;
an unlabeled case becomes labeled); otherwise a new labeled case (``CaseStore.add_labeled``)
named after the volume. Test cases are refused: they never take part in training.

Segment names must match the store's label set (case, spaces and dashes ignored); otherwise the
export is refused before anything is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from GuidedSegLib.geometry import Grid
from GuidedSegLib.labels import normalise_name
from GuidedSegLib.store import CASE_ID, Case, CaseStore

from . import nodes

DRAFT_LABELS_ATTRIBUTE = "GuidedSeg.DraftLabels"  # JSON {value: name} of the draft's label values


class ExportRefused(ValueError):
    """The export cannot go ahead; the message says why and what to do. Nothing was written."""


@dataclass
class OrganChoice:
    """One organ of the store's label set as the export dialog shows it."""

    value: int
    name: str
    segment_name: str | None  # the segment that holds it, if any
    voxels: int  # voxels in the segment (0: empty or no segment)
    edited: bool  # differs from the draft (always counted)

    def status(self, checked: bool) -> str:
        """"annotated", "absent" or "unannotated"."""
        if not (self.edited or checked):
            return "unannotated"
        return "annotated" if self.voxels else "absent"


@dataclass
class ExportPlan:
    """Everything the dialog shows and :func:`perform_export` writes."""

    store_root: Path
    case_id: str
    action: str  # "ingest" (new label version of an existing case) or "add" (new labeled case)
    case_kind: str | None  # kind of the existing case, for "ingest"
    organs: list[OrganChoice]
    label: np.ndarray = field(repr=False)  # (K, J, I) store values of every segment
    grid: Grid = field(repr=False)
    volume_node: object = field(repr=False)
    model: str | None = None
    draft_found: bool = False

    @property
    def edited(self) -> list[int]:
        return [o.value for o in self.organs if o.edited]

    def annotation(self, checked=()) -> tuple[list[int], list[int]]:
        """(annotated, absent) organ values for the organs ticked as checked plus the edited ones."""
        checked = {int(v) for v in checked}
        unknown = checked - {o.value for o in self.organs}
        if unknown:
            raise ExportRefused(f"values {sorted(unknown)} are not organs of the store")
        annotated = [o.value for o in self.organs if o.status(o.value in checked) == "annotated"]
        absent = [o.value for o in self.organs if o.status(o.value in checked) == "absent"]
        return annotated, absent

    def summary(self, checked=()) -> str:
        """What the dialog says will be recorded."""
        checked = {int(v) for v in checked}
        annotated, absent = self.annotation(checked)
        names = {o.value: o.name for o in self.organs}

        def listed(values, mark=True):
            if not values:
                return "none"
            out = []
            for v in values:
                how = " (edited)" if v in self.edited else " (checked)"
                out.append(names[v] + (how if mark else ""))
            return ", ".join(out)

        unannotated = [o.value for o in self.organs if o.value not in annotated and o.value not in absent]
        where = (f"new label version of case {self.case_id}" if self.action == "ingest"
                 else f"new labeled case {self.case_id}")
        lines = [f"Store: {self.store_root}", f"Writes: {where}"]
        if not self.draft_found:
            lines.append("No model draft found for this segmentation, so no segment counts as edited: "
                         "tick every organ you reviewed.")
        lines += [f"Counted as annotated: {listed(annotated)}",
                  f"Checked and absent: {listed(absent)}",
                  f"Not annotated (unknown to training, left out of the label): {listed(unannotated, mark=False)}"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def store_values(segment_names: list[str], store: CaseStore) -> dict[str, int]:
    """Segment name -> store label value; ExportRefused naming every segment that does not match."""
    by_name = {normalise_name(n): v for v, n in store.organs.items()}
    unknown = [n for n in segment_names if normalise_name(n) not in by_name]
    if unknown:
        raise ExportRefused(
            f"Segments {', '.join(repr(n) for n in unknown)} are not in the store's label set "
            f"({', '.join(store.organs.values())}). Rename them to one of these names, or delete them, "
            "then export again. Nothing was written.")
    values = {n: by_name[normalise_name(n)] for n in segment_names}
    seen: dict[int, str] = {}
    for name, value in values.items():
        if value in seen:
            raise ExportRefused(f"Segments {seen[value]!r} and {name!r} are both the store's organ "
                                f"{store.organs[value]!r}; merge them into one segment. Nothing was written.")
        seen[value] = name
    if len(segment_names) != len(values):
        raise ExportRefused("Two segments have the same name; merge them into one segment. Nothing was written.")
    return values


def find_case(store: CaseStore, volume_node) -> Case | None:
    """The store case this volume is, or None: by the id the panel recorded on the node at an
    earlier export, else by the file the volume was loaded from."""
    case_id = volume_node.GetAttribute(nodes.CASE_ATTRIBUTE)
    store_root = volume_node.GetAttribute(nodes.STORE_ATTRIBUTE)
    if case_id and store_root and Path(store_root).resolve() == store.root and case_id in store:
        return store.case(case_id)
    storage = volume_node.GetStorageNode()
    file_name = storage.GetFileName() if storage is not None else None
    if file_name:
        path = Path(file_name).resolve()
        for case in store.cases():
            if case.image == path:
                return case
    return None


def new_case_id(store: CaseStore, name: str) -> str:
    """A case id from a volume's name that the store does not hold yet."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._-")[:100] or "case"
    if not CASE_ID.match(base):
        base = f"case_{base}"
    candidate, number = base, 2
    while candidate in store:
        candidate, number = f"{base}-{number}", number + 1
    return candidate


def _draft(segmentation_node, volume_node) -> tuple[np.ndarray | None, dict[str, int]]:
    """The draft label array (K, J, I) and its name -> value map, or (None, {}) when unavailable."""
    text = segmentation_node.GetAttribute(DRAFT_LABELS_ATTRIBUTE)
    if not text:
        return None, {}
    try:
        names = {int(v): str(n) for v, n in json.loads(text).items()}
    except (ValueError, AttributeError):
        return None, {}
    draft = nodes.draft_array(segmentation_node, volume_node)
    if draft is None:
        return None, {}
    return draft, {normalise_name(n): v for v, n in names.items()}


def _differs(mask: np.ndarray, name: str, draft: np.ndarray, draft_values: dict[str, int]) -> bool:
    draft_value = draft_values.get(normalise_name(name))
    reference = draft == draft_value if draft_value is not None else np.zeros_like(mask)
    return not np.array_equal(mask, reference)


def edited_segments(segmentation_node, volume_node, segmentations_logic, scene) -> list[str] | None:
    """Names of the segments whose voxels differ from the model's draft (deleted organs of the
    draft included); None when there is no draft to compare with."""
    draft, draft_values = _draft(segmentation_node, volume_node)
    if draft is None:
        return None
    edited, seen = [], set()
    for segment_id, name in nodes.segments(segmentation_node):
        mask = nodes.segment_mask(segmentation_node, segment_id, volume_node, segmentations_logic, scene)
        seen.add(normalise_name(name))
        if _differs(mask, name, draft, draft_values):
            edited.append(name)
    for key, value in draft_values.items():
        if key not in seen and np.any(draft == value):
            edited.append(key)  # the segment was deleted
    return edited


def plan_export(segmentation_node, volume_node, store: CaseStore, segmentations_logic, scene) -> ExportPlan:
    """Check the segments against the store and work out what an export would record.

    Raises ExportRefused (segment names outside the store's label set, a test case, no
    volume); writes nothing.
    """
    if segmentation_node is None:
        raise ExportRefused("There is no segmentation to export: click Segment first.")
    if volume_node is None:
        raise ExportRefused("Choose the volume the segmentation belongs to.")
    segment_list = nodes.segments(segmentation_node)
    if not segment_list:
        raise ExportRefused(f"{segmentation_node.GetName()} has no segments; nothing to export.")
    values = store_values([name for _, name in segment_list], store)

    case = find_case(store, volume_node)
    if case is not None and case.kind == "test":
        raise ExportRefused(f"This volume is test case {case.case_id} of the store; test cases are never used "
                            "for training, so their labels are not replaced. Nothing was written.")
    grid = nodes.volume_grid(volume_node)
    draft, draft_values = _draft(segmentation_node, volume_node)

    shape = tuple(reversed(grid.size))
    label = np.zeros(shape, np.uint8 if max(store.organs, default=0) <= 255 else np.uint16)
    painted = []
    organs = {v: OrganChoice(v, n, None, 0, False) for v, n in sorted(store.organs.items())}
    for segment_id, name in segment_list:
        mask = nodes.segment_mask(segmentation_node, segment_id, volume_node, segmentations_logic, scene)
        value = values[name]
        voxels = int(np.count_nonzero(mask))
        edited = draft is not None and _differs(mask, name, draft, draft_values)  # no draft: the user ticks
        organs[value] = OrganChoice(value, store.organs[value], name, voxels, edited)
        painted.append((voxels, value, mask))
    for _, value, mask in sorted(painted, key=lambda item: -item[0]):  # where segments overlap, the smaller wins
        label[mask] = value

    model = segmentation_node.GetAttribute(nodes.MODEL_NAME_ATTRIBUTE) or segmentation_node.GetAttribute(
        nodes.MODEL_ATTRIBUTE)
    if case is not None:
        return ExportPlan(store.root, case.case_id, "ingest", case.kind, list(organs.values()), label, grid,
                          volume_node, model, draft is not None)
    return ExportPlan(store.root, new_case_id(store, volume_node.GetName()), "add", None, list(organs.values()),
                      label, grid, volume_node, model, draft is not None)


def perform_export(plan: ExportPlan, store: CaseStore, checked=(), source: str = "GuidedSeg Slicer panel") -> Case:
    """Write the plan into the store with the edited + ``checked`` organs as its annotated set.

    Only annotated organs' voxels go into the stored label. The store refuses (and leaves
    everything as it was) a label that does not fit it; its error names the file and problem.
    """
    if Path(plan.store_root) != store.root:
        raise ExportRefused(f"the export was planned for {plan.store_root}, not {store.root}")
    annotated, absent = plan.annotation(checked)
    if not annotated and not absent:
        raise ExportRefused("No segment was edited and none is ticked as checked, so the label would say nothing. "
                            "Tick the organs you checked, then export again. Nothing was written.")
    keep = np.isin(plan.label, annotated)
    image = sitk.GetImageFromArray(np.where(keep, plan.label, 0).astype(plan.label.dtype))
    plan.grid.apply(image)
    if plan.action == "ingest":
        case = store.ingest_label(plan.case_id, image, annotated=annotated, absent=absent, source=source,
                                  model=plan.model)
    else:
        case = store.add_labeled(nodes.volume_to_image(plan.volume_node), image, plan.case_id, annotated=annotated,
                                 absent=absent, source=source, model=plan.model)
    plan.volume_node.SetAttribute(nodes.CASE_ATTRIBUTE, case.case_id)
    plan.volume_node.SetAttribute(nodes.STORE_ATTRIBUTE, str(store.root))
    return case
