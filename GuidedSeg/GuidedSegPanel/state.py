"""What the panel shows and which buttons it enables, worked out from plain facts.

The widget copies a :class:`PanelView` onto its controls and nothing else decides; tests build a
:class:`PanelState` and check the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PanelState:
    """Facts about the panel's situation."""

    missing_packages: list[str] = field(default_factory=list)  # pip names still to install
    has_volume: bool = False
    models_folder_problem: str | None = None
    models_folder_chosen: bool = True  # False: none chosen yet (import and the starter model use a default)
    model_count: int = 0
    model_problem: str | None = None  # the chosen bundle cannot be used (why), or None
    has_model: bool = False
    segmenting: bool = False
    has_segmentation: bool = False
    store_problem: str | None = None  # the store cannot be used (why), or None
    has_store: bool = False
    training: bool = False
    train_script_found: bool = True
    ranking: bool = False  # guidedseg suggest is running
    fine_tuning: bool = False
    queue_length: int = 0  # unlabeled cases waiting
    labeled_count: int = 0
    has_parent: bool = False  # the chosen model was fine-tuned from a listed one
    current_case: str = ""  # the store case loaded by Next case or Re-open


@dataclass
class PanelView:
    """What the widget shows."""

    install_visible: bool
    segment_enabled: bool
    segment_text: str
    segment_tooltip: str
    correct_enabled: bool
    export_enabled: bool
    export_tooltip: str
    train_enabled: bool
    train_text: str
    train_tooltip: str
    inputs_enabled: bool  # volume, model and device choices (locked while segmenting)
    starter_visible: bool  # "Train a starter model": there is no model and nothing is training
    message: str  # the most useful thing to say now; "" when nothing needs saying
    rank_enabled: bool = False
    rank_text: str = "Rank"
    next_enabled: bool = False  # Next case and Skip
    queue_text: str = ""
    reopen_enabled: bool = False
    fine_tune_enabled: bool = False
    fine_tune_text: str = "Fine-tune"
    fine_tune_tooltip: str = ""
    parent_enabled: bool = False


def view(state: PanelState) -> PanelView:
    messages = []
    if state.missing_packages:
        messages.append(f"Slicer's Python lacks {', '.join(state.missing_packages)}: Segment and Train need them. "
                        "Click Install (you are asked first; it downloads about 1-3 GB).")
    no_model = state.model_count == 0
    if state.models_folder_chosen and state.models_folder_problem:
        messages.append(state.models_folder_problem)
    elif no_model and not state.training:
        messages.append("No model yet. Import a model bundle (a folder or a .zip; it is checked before it is listed), "
                        "train one from a case store in the Train section, or click \"Train a starter model\": "
                        "it learns from synthetic phantoms in the background (minutes on a GPU, longer on a CPU).")
    elif no_model and state.training:
        messages.append("Training a model; it appears in the model list when done.")
    elif state.model_problem:
        messages.append(state.model_problem)

    segment_ready = state.has_volume and state.has_model and state.model_problem is None
    if state.segmenting:
        segment_tip = "Stop the segmentation (nothing is kept)"
    elif not state.has_volume:
        segment_tip = "Choose an input volume first"
    elif not segment_ready:
        segment_tip = "Choose a usable model first"
    else:
        segment_tip = "Segment the volume with the chosen model (runs in the background)"

    store_ready = state.has_store and state.store_problem is None
    if state.store_problem:
        messages.append(state.store_problem)
    export_ready = state.has_segmentation and state.has_volume and store_ready and not state.segmenting
    if not state.has_segmentation:
        export_tip = "Segment a volume (or choose a segmentation) first"
    elif not store_ready:
        export_tip = "Choose a case store first"
    else:
        export_tip = "Write the volume and the corrected labels into the case store (asks first)"

    if state.training:
        train_tip = "Stop training (the checkpoint is kept; no model bundle is written)"
    elif not store_ready:
        train_tip = "Choose a case store with labeled cases first"
    elif state.models_folder_problem:
        train_tip = "Choose a models folder first; the new model bundle is written there"
    elif not state.train_script_found:
        train_tip = "Training/train.py is not installed with this extension"
    else:
        train_tip = "Train a new model on the store in the background; the bundle appears in the model list"
    train_ready = store_ready and not state.models_folder_problem and state.train_script_found
    model_ready = state.has_model and state.model_problem is None
    if not store_ready:
        queue_text = ""
    elif state.queue_length == 0:
        queue_text = "The queue is empty: every training case of the store is labeled."
    else:
        queue_text = f"{state.queue_length} unlabeled case(s) in the queue."
    if store_ready and state.current_case:
        queue_text = f"Current case: {state.current_case}. {queue_text}"
    if state.fine_tuning:
        fine_tune_tip = "Stop the fine-tune (no new model is written)"
    elif not (train_ready and model_ready):
        fine_tune_tip = "Choose a case store, a models folder and the model to start from first"
    elif state.training:
        fine_tune_tip = "Training is running; fine-tune when it is done"
    else:
        fine_tune_tip = ("Fine-tune the chosen model on the store as it is now (runs in the background); "
                         "a new version appears in the model list")

    return PanelView(
        install_visible=bool(state.missing_packages),
        segment_enabled=state.segmenting or segment_ready,
        segment_text="Cancel" if state.segmenting else "Segment",
        segment_tooltip=segment_tip,
        correct_enabled=state.has_segmentation and not state.segmenting,
        export_enabled=export_ready,
        export_tooltip=export_tip,
        train_enabled=state.training or train_ready,
        train_text="Cancel training" if state.training else "Train",
        train_tooltip=train_tip,
        inputs_enabled=not state.segmenting,
        starter_visible=no_model and not state.training and state.train_script_found,
        message="\n".join(messages),
        rank_enabled=state.ranking or (store_ready and model_ready and state.queue_length > 0),
        rank_text="Cancel ranking" if state.ranking else "Rank",
        next_enabled=store_ready and state.queue_length > 0 and not state.segmenting,
        queue_text=queue_text,
        reopen_enabled=store_ready and state.labeled_count > 0 and not state.segmenting,
        fine_tune_enabled=state.fine_tuning or (train_ready and model_ready and not state.training),
        fine_tune_text="Cancel fine-tune" if state.fine_tuning else "Fine-tune",
        fine_tune_tooltip=fine_tune_tip,
        parent_enabled=state.has_parent and not state.segmenting,
    )


def elide_path(path, limit: int = 48) -> str:
    """A path short enough for a label that must not widen the panel: its last parts after "...",
    e.g. ".../models/three-organs" (the whole path goes in the tooltip)."""
    text = str(path)
    if len(text) <= limit:
        return text
    parts = text.replace("\\", "/").split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(tail) + 5 > limit:
            break
        tail = f"{part}/{tail}"
    return "..." + ("/" if not tail.startswith("/") else "") + (tail if len(tail) <= limit - 4 else tail[-(limit - 4):])
