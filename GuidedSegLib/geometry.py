"""Image grids (size, spacing, origin, direction) and exact placement of one grid inside another."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """The physical sampling grid of a 3D image, in SimpleITK's (x, y, z) order and LPS space."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3, columns are the axis directions

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        return cls(
            tuple(int(s) for s in data["size"]),
            tuple(float(s) for s in data["spacing"]),
            tuple(float(o) for o in data["origin"]),
            tuple(float(d) for d in data["direction"]),
        )

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Stamp this grid's spacing, origin and direction on ``image`` (sizes must agree)."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} differs from grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image on this grid, for use as a resampling reference."""
        return self.apply(sitk.Image(list(self.size), pixel_type))

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 matrix mapping continuous (i, j, k, 1) indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def mismatch(self, other: Grid, tolerance: float = 1e-4) -> str | None:
        """Why ``other`` is not the same grid as this one, or None when it is.

        Spacing and origin are compared relative to max(1, |value|) so that float32 storage
        (NIfTI headers) does not count as a difference; direction cosines absolutely.
        """
        if self.size != other.size:
            return f"size {list(other.size)} != {list(self.size)}"
        for name in ("spacing", "origin"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if np.any(np.abs(a - b) > tolerance * np.maximum(1.0, np.abs(a))):
                return f"{name} {np.round(b, 6).tolist()} != {np.round(a, 6).tolist()}"
        if np.max(np.abs(np.subtract(self.direction, other.direction))) > tolerance:
            return f"direction {np.round(other.direction, 6).tolist()} != {np.round(self.direction, 6).tolist()}"
        return None


def embed_in_grid(image: sitk.Image, target: Grid, tolerance: float = 1e-3) -> sitk.Image:
    """Place ``image`` onto ``target`` exactly, padding with 0 and cropping what lies outside.

    For label maps saved on a sub-block (or a superset) of the target grid, as Slicer's
    ``.seg.nrrd`` files are: spacing and direction must agree and the voxel offset must be a
    whole number of voxels. No interpolation happens, so labels are copied bit for bit.
    Raises ValueError saying what does not line up.
    """
    source = Grid.of(image)
    if np.any(np.abs(np.subtract(source.spacing, target.spacing)) > tolerance * np.maximum(1.0, np.abs(target.spacing))):
        raise ValueError(f"its spacing {np.round(source.spacing, 6).tolist()} differs from the image's "
                         f"{np.round(target.spacing, 6).tolist()}")
    if np.max(np.abs(np.subtract(source.direction, target.direction))) > tolerance:
        raise ValueError("its axis directions differ from the image's")
    inverse = np.linalg.inv(target.index_to_physical_matrix())
    offset = (inverse @ np.append(source.origin, 1.0))[:3]  # source voxel 0 in target indices
    rounded = np.round(offset)
    if np.any(np.abs(offset - rounded) > tolerance):
        raise ValueError(f"its voxels are shifted by a fraction of a voxel ({np.round(offset - rounded, 4).tolist()}) "
                         "against the image's grid")
    start = rounded.astype(int)  # (x, y, z)
    src = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    out = np.zeros(target.size[::-1], dtype=src.dtype)
    lo_t = np.maximum(start, 0)
    hi_t = np.minimum(start + np.asarray(source.size), np.asarray(target.size))
    if np.all(hi_t > lo_t):
        lo_s, hi_s = lo_t - start, hi_t - start
        out[lo_t[2]:hi_t[2], lo_t[1]:hi_t[1], lo_t[0]:hi_t[0]] = src[lo_s[2]:hi_s[2], lo_s[1]:hi_s[1], lo_s[0]:hi_s[0]]
    if np.count_nonzero(out) != np.count_nonzero(src):
        raise ValueError("part of its non-zero voxels lie outside the image")
    placed = sitk.GetImageFromArray(out)
    return target.apply(placed)
