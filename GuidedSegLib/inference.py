"""Segment a scan with a model bundle: the bundle's preprocessing, MONAI sliding-window inference,
and the result brought back onto the scan's own grid (origin, spacing, direction, size).

This is the plain, correct path the trainer's benchmark and the demo use; batching, mixed
precision and memory-bounded stitching for very large scans belong to the inference issue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import load_networks
from .preprocessing import (
    Preprocessed,
    PreprocessingPlan,
    preprocess,
    restore_probabilities,
)


class Predictor:
    """A bundle loaded once; :meth:`segment` turns an image into a label map on its grid."""

    def __init__(self, bundle: str | Path, device: str = "cpu", ensemble: bool = False):
        self.device = torch.device(device)
        names = None if ensemble else ["A"]
        self.metadata, networks = load_networks(bundle, self.device, names)
        self.networks = list(networks.values())
        self.plan = PreprocessingPlan.from_dict(self.metadata["preprocessing"])
        self.patch = tuple(self.metadata["patch"])
        stride = self.metadata["stride"]
        self.overlap = float(np.clip(1.0 - min(s / p for s, p in zip(stride, self.patch)), 0.0, 0.95))
        self.class_values = [int(v) for v in self.metadata["labels"]]

    @torch.inference_mode()
    def probabilities(self, image: sitk.Image) -> tuple[np.ndarray, Preprocessed]:
        """Class probabilities ``(K, z, y, x)`` on the preprocessed grid, and the preprocessing."""
        from monai.inferers import sliding_window_inference

        prepared = preprocess(image, self.plan)
        array = torch.from_numpy(sitk.GetArrayFromImage(prepared.image))[None, None].to(self.device)

        def predict(x):
            return sum(torch.softmax(net(x)[0].float(), 1) for net in self.networks) / len(self.networks)

        probs = sliding_window_inference(array, self.patch, 2, predict, overlap=self.overlap, mode="gaussian")
        return probs[0].cpu().numpy(), prepared

    def segment(self, image: sitk.Image) -> sitk.Image:
        """A label map (the bundle's label values) on ``image``'s own grid."""
        probs, prepared = self.probabilities(image)
        label = restore_probabilities(probs, prepared.grid, prepared.source)  # class indices
        values = np.asarray(self.class_values)
        if not np.array_equal(values, np.arange(len(values))):
            out = sitk.GetImageFromArray(values[sitk.GetArrayFromImage(label)].astype(np.uint16))
            out.CopyInformation(label)
            label = out
        return label
