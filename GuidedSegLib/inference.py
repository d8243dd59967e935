"""Segment a scan with a model bundle: the bundle's preprocessing, MONAI sliding-window inference,
and the result brought back onto the scan's own grid (origin, spacing, direction, size).

What makes it fast and memory-bounded, compared with calling MONAI's ``sliding_window_inference``
on the whole preprocessed volume:
- windows are only placed over the body: the box around voxels brighter than the background
  (the air around a CT patient), grown to at least one window where the scan allows;
- windows run in batches under ``torch.inference_mode``, with mixed precision and channels-last
  on GPUs and on CPUs that compute bfloat16 in hardware;
- the blended class probabilities are kept in float16, and :func:`restore_probabilities` brings
  them onto the scan's grid slab by slab, so no full-resolution float32 map of every class ever
  exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import load_networks
from .devices import cpu_has_native_bf16, resolve_device
from .errors import GuidedSegError
from .preprocessing import PreprocessingPlan, preprocess, restore_probabilities

Progress = Callable[[str, float], None]  # (stage, fraction of that stage done)
Head = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (network index, logits, features) -> maps
STAGES = ("preprocess", "infer", "restore", "cleanup")


class InferenceStopped(GuidedSegError):
    """Raised inside inference when the caller asked it to stop."""


class Predictor:
    """A bundle loaded once; :meth:`segment` turns an image into a label map on its own grid.

    device: cpu, cuda, cuda:N, mps or auto. ensemble: average networks A and B (two-network
    bundles). amp: mixed precision (None: on for CUDA, and on CPUs with hardware bfloat16, where
    it about halves the time). window_batch: windows per forward pass (None: 4 on GPUs, 1 on
    CPU, where larger batches only add memory).
    """

    def __init__(self, bundle: str | Path, device: str = "cpu", ensemble: bool = False,
                 amp: bool | None = None, window_batch: int | None = None):
        self.device = resolve_device(device)
        self.metadata, networks = load_networks(bundle, self.device, None if ensemble else ["A"])
        self.networks = list(networks.values())
        self.plan = PreprocessingPlan.from_dict(self.metadata["preprocessing"])
        self.patch = tuple(int(p) for p in self.metadata["patch"])  # (z, y, x)
        self.stride = tuple(int(s) for s in self.metadata["stride"])
        self.class_values = np.asarray([int(v) for v in self.metadata["labels"]])
        gpu = self.device.type == "cuda"
        if amp is None:
            amp = gpu or (self.device.type == "cpu" and cpu_has_native_bf16())
        self.amp = amp
        self.amp_dtype = torch.bfloat16 if not gpu or torch.cuda.is_bf16_supported() else torch.float16
        self.window_batch = window_batch or (4 if self.device.type != "cpu" else 1)
        # Channels-last pays off with mixed precision (cuDNN, oneDNN's bfloat16 kernels), not in fp32 on CPUs.
        self.channels_last = gpu or (self.amp and self.device.type == "cpu")
        if self.channels_last:
            for network in self.networks:
                network.to(memory_format=torch.channels_last_3d)

    @property
    def overlap(self) -> tuple[float, ...]:
        """Per-axis overlap for MONAI that gives exactly the bundle's stride (MONAI floors p*(1-o))."""
        return tuple(float(np.clip(1.0 - (s + 0.5) / p, 0.0, 0.99)) for s, p in zip(self.stride, self.patch))

    def segment(self, image: sitk.Image, lcc: bool = False, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> sitk.Image:
        """A label map (the bundle's label values) on ``image``'s own grid.

        lcc: keep only the largest connected component of each organ. progress(stage, fraction)
        is called as each stage advances; ``should_stop()`` is polled between windows and stages,
        and a True answer raises :class:`InferenceStopped`.
        """
        report = progress or (lambda stage, fraction: None)
        stop = should_stop or (lambda: False)
        report("preprocess", 0.0)
        prepared = preprocess(image, self.plan)
        volume = sitk.GetArrayFromImage(prepared.image)  # (z, y, x) float32
        report("preprocess", 1.0)
        probabilities = self.probabilities(volume, lambda f: report("infer", f), stop)
        del volume
        if stop():
            raise InferenceStopped("stopped")
        label = restore_probabilities(probabilities, prepared.grid, prepared.source,
                                      progress=lambda f: report("restore", f))
        del probabilities
        indices = sitk.GetArrayFromImage(label)
        if lcc:
            keep_largest_components(indices, progress=lambda f: report("cleanup", f))
        if not np.array_equal(self.class_values, np.arange(len(self.class_values))):
            indices = self.class_values[indices].astype(np.uint8 if self.class_values.max() < 256 else np.uint16)
        out = sitk.GetImageFromArray(indices)
        out.CopyInformation(label)
        return out

    @torch.inference_mode()
    def probabilities(self, volume: np.ndarray, progress: Callable[[float], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, separate: bool = False,
                      head: Head | None = None) -> np.ndarray:
        """Class probabilities ``(K, z, y, x)`` float16 for a preprocessed ``(z, y, x)`` volume.

        Windows cover only :func:`body_box`; outside it the background has probability 1.
        ``separate``: each network's own probabilities, stacked, ``(N * K, z, y, x)`` (network A's
        K channels first), from the same windows. ``head(i, logits, features)``: what network i's
        window gives instead of its softmax: M class-probability maps of K channels each
        (``(B, M * K, *patch)``); the result is then ``(N * M * K, z, y, x)``.
        """
        from monai.inferers import sliding_window_inference

        box = body_box(volume, self.patch)
        region = volume[box]
        background = float(volume.min())
        windows = count_windows(region.shape, self.patch, self.stride)
        done = 0

        def predict(batch: torch.Tensor) -> torch.Tensor:  # (B, 1, *patch) -> (B, K, *patch)
            nonlocal done
            if should_stop is not None and should_stop():
                raise InferenceStopped("stopped")
            batch = batch.float()
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                outputs = [net(batch) for net in self.networks]
                if head is None:
                    each = [torch.softmax(out[0].float(), 1) for out in outputs]
                else:
                    each = [head(i, out[0], out[1]).float() for i, out in enumerate(outputs)]
                mean = torch.cat(each, 1) if separate else sum(each) / len(each)
            done += batch.shape[0]
            if progress is not None:
                progress(min(1.0, done / windows))
            return mean.to(torch.float16)

        inputs = torch.from_numpy(np.ascontiguousarray(region)).to(self.device, torch.float16)[None, None]
        stitched = sliding_window_inference(inputs, self.patch, self.window_batch, predict, overlap=self.overlap,
                                            mode="gaussian", cval=background, sw_device=self.device,
                                            device=self.device)
        classes = len(self.class_values)
        out = np.zeros((stitched.shape[1], *volume.shape), dtype=np.float16)
        out[::classes] = 1.0  # outside the box: background 1 in every K-channel map
        out[(slice(None), *box)] = stitched[0].cpu().numpy()
        return out


def body_box(volume: np.ndarray, patch: tuple[int, ...], margin: int = 4) -> tuple[slice, ...]:
    """The box (z, y, x slices) around the voxels brighter than the background (the darkest
    value: air outside a CT patient, after clipping), plus ``margin``, grown to at least
    ``patch`` along each axis where the volume is large enough. The whole volume when nothing
    stands out (MRI noise, a phantom filled to the edge)."""
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
        return tuple(slice(0, n) for n in volume.shape)
    inside = volume > low + 0.01 * (high - low)
    box = []
    for axis, size in enumerate(volume.shape):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(volume.ndim) if a != axis)))
        start, stop = max(0, hit[0] - margin), min(size, hit[-1] + 1 + margin)
        short = patch[axis] - (stop - start)
        if short > 0:  # real context rather than padding where the scan has it
            start = max(0, start - (short + 1) // 2)
            stop = min(size, start + patch[axis])
            start = max(0, stop - patch[axis])
        box.append(slice(int(start), int(stop)))
    return tuple(box)


def count_windows(shape: tuple[int, ...], patch: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many windows MONAI places over ``shape`` (smaller axes are padded to one window)."""
    total = 1
    for size, p, s in zip(shape, patch, stride):
        total *= 1 if size <= p else int(np.ceil((size - p) / max(1, min(s, p)))) + 1
    return total


def keep_largest_components(indices: np.ndarray, progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Keep only the largest 26-connected component of each class > 0 of a (z, y, x) class-index
    map, in place; the removed voxels become background. Works on each class's bounding box."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 3)
    boxes = ndimage.find_objects(indices)
    for value, box in enumerate(boxes, start=1):
        if box is not None:
            mask = indices[box] == value
            components, count = ndimage.label(mask, structure)
            if count > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                indices[box][mask & (components != int(sizes.argmax()))] = 0
        if progress is not None:
            progress(value / len(boxes))
    return indices
