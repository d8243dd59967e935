"""Deterministic synthetic abdominal CT volumes with the 13 FLARE22 organs (the embedded default data set).

The anatomy is modelled in millimetres in patient LPS coordinates (+x left, +y posterior, +z superior), so
any grid size or spacing samples the same patient. Organs are implicit shapes (ellipsoids, and spheres swept
along smooth centre lines) with a random pose each, inside a body whose coordinates are bent by a smooth
random displacement field. Soft-tissue organs share overlapping intensity ranges, so intensity alone does not
separate them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .labels import FLARE22_LABELS

if TYPE_CHECKING:
    from .store import CaseStore

__all__ = ["Phantom", "generate_phantom", "write_phantom_store"]

_ID = {name: value for value, name in FLARE22_LABELS.items()}

# Anatomical frame: x = 0 on the midline, y = 0 mid-body, z = 0 at about L1/L2 (the renal hila). The volume
# centre sits this high, so a default field of view runs from the lung bases to the iliac crests.
_Z_CENTRE = 25.0
# Random fields that shape the anatomy are drawn on a lattice fixed in physical space (not on the voxel grid),
# so one seed gives the same patient at any resolution.
_LATTICE_HALF_EXTENT = 420.0
_F32 = np.float32


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume (int16 HU) and its FLARE22 label map (uint8, 0..13) on the same grid."""

    image: sitk.Image
    label: sitk.Image


def generate_phantom(
    seed: int,
    size: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] | None = None,
) -> Phantom:
    """Synthetic abdominal CT case number `seed`; the same arguments give bit-identical arrays.

    size and spacing are (x, y, z) in SimpleITK order. spacing None -> drawn from the seed: anisotropic,
    in-plane ~3.4-4.2 mm, slices ~4.5-6 mm, so that a 96x96x64 volume covers a whole abdomen
    (body ~ 330 mm wide, ~240 mm anterior-posterior).
    """
    size = _check_size(size)
    spacing = None if spacing is None else _check_spacing(spacing)
    case = _Case(np.random.default_rng(seed), size, spacing)
    b = _Builder(case)
    _paint_body(b, case)
    _paint_organs(b, case)
    image = sitk.GetImageFromArray(_acquire(b, case))
    image.SetSpacing(case.spacing)
    image.SetOrigin(tuple(float(o) for o in b.origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    label = sitk.GetImageFromArray(b.lab)
    label.CopyInformation(image)
    return Phantom(image=image, label=label)


def _check_size(size) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in size)
        if any(v != w for v, w in zip(values, size)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"size must be three integers (x, y, z), got {size!r}") from None
    if len(values) != 3:
        raise ValueError(f"size must have three entries (x, y, z), got {size!r}")
    if min(values) < 8:
        raise ValueError(f"size entries must be >= 8 voxels, got {values}")
    return values


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers in mm (x, y, z), got {spacing!r}") from None
    if len(values) != 3:
        raise ValueError(f"spacing must have three entries (x, y, z), got {spacing!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing entries must be finite and > 0 mm, got {values}")
    return values


# ---------------------------------------------------------------------------------------------- geometry helpers


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    ax, ay, az = (math.radians(a) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid_axes(size, spacing) -> tuple[np.ndarray, list[np.ndarray]]:
    """Origin and per-axis physical voxel coordinates (x, y, z) of a grid centred on the physical origin."""
    origin = -0.5 * (np.asarray(size) - 1) * np.asarray(spacing, float)
    return origin, [origin[i] + spacing[i] * np.arange(size[i]) for i in range(3)]


def _smooth_field(rng: np.random.Generator, axes: list[np.ndarray], cell: float, fixed_lattice: bool) -> np.ndarray:
    """Unit-variance random field, smooth on the scale `cell` mm, sampled on axes (x, y, z); returns (z, y, x).

    Gaussian kernels on a knot lattice, applied axis by axis (three small matrix products instead of a 3D
    filter). fixed_lattice: knot values live on a lattice fixed in physical space (resolution independent);
    otherwise only knots around the grid are drawn (cheaper, for image texture).
    """
    fixed_lattice = fixed_lattice and all(
        c[0] > -_LATTICE_HALF_EXTENT + 3 * cell and c[-1] < _LATTICE_HALF_EXTENT - 3 * cell for c in axes)
    mats, spans = [], []
    for c in axes:
        if fixed_lattice:
            knots = -_LATTICE_HALF_EXTENT + cell * np.arange(int(math.ceil(2 * _LATTICE_HALF_EXTENT / cell)) + 1)
            lo, hi = int(np.searchsorted(knots, c[0] - 3 * cell)), int(np.searchsorted(knots, c[-1] + 3 * cell))
        else:
            knots = c[0] - 2 * cell + cell * np.arange(int(math.ceil((c[-1] - c[0]) / cell)) + 5)
            lo, hi = 0, len(knots)
        w = np.exp(-0.5 * ((c[:, None] - knots[None, lo:hi]) / (0.6 * cell)) ** 2)
        # Unit L2 norm per row makes the tensor-product field unit-variance everywhere.
        mats.append((w / np.sqrt((w**2).sum(axis=1, keepdims=True) + 1e-30)).astype(_F32))
        spans.append((lo, hi, len(knots)))
    wx, wy, wz = mats
    (x0, x1, nx), (y0, y1, ny), (z0, z1, nz) = spans
    # The whole lattice is drawn so that the value at a given place does not depend on the grid.
    g = rng.standard_normal((nz, ny, nx), dtype=_F32)[z0:z1, y0:y1, x0:x1]
    f = wy @ (g @ wx.T)  # (kz, ny, nx)
    return (wz @ f.reshape(f.shape[0], -1)).reshape(len(axes[2]), len(axes[1]), len(axes[0]))


def _smooth3(a: np.ndarray, weights: tuple[float, float, float]) -> np.ndarray:
    """Separable 3-tap blur [w, 1-2w, w] along (z, y, x), edges replicated: a cheap partial-volume effect."""
    for axis, w in enumerate(weights):
        if w <= 0 or a.shape[axis] < 2:
            continue
        def part(s):
            index = [slice(None)] * 3
            index[axis] = s
            return tuple(index)
        out = a * _F32(1 - 2 * w)
        out[part(slice(1, None))] += _F32(w) * a[part(slice(None, -1))]
        out[part(slice(None, -1))] += _F32(w) * a[part(slice(1, None))]
        out[part(slice(0, 1))] += _F32(w) * a[part(slice(0, 1))]
        out[part(slice(-1, None))] += _F32(w) * a[part(slice(-1, None))]
        a = out
    return a


def _catmull_rom(points, radii, per_segment: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curve through the points, as a denser polyline (radii interpolated linearly)."""
    points, radii = np.asarray(points, float), np.asarray(radii, float)
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out, rad = [], []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
        rad.append(radii[i - 1] + (radii[i] - radii[i - 1]) * t[:, 0])
    return np.vstack(out + [points[-1:]]), np.concatenate(rad + [radii[-1:]])


class _Pose:
    """Random pose of an organ about its nominal centre: x -> centre + shift + lin @ (x - centre)."""

    def __init__(self, rng: np.random.Generator, centre, shift_mm: float, scale_frac: float, rot_deg: float):
        self.centre = np.asarray(centre, float)
        self.shift = rng.uniform(-shift_mm, shift_mm, 3)
        scale = 1 + rng.uniform(-scale_frac, scale_frac) + rng.uniform(-0.04, 0.04, 3)  # slightly anisotropic
        self.lin = _rot(*rng.uniform(-rot_deg, rot_deg, 3)) @ np.diag(scale)
        self.radius_scale = float(abs(np.linalg.det(self.lin)) ** (1 / 3))

    def point(self, p) -> np.ndarray:
        return self.centre + self.shift + (np.asarray(p, float) - self.centre) @ self.lin.T

    def ellipsoid(self, centre, frame) -> tuple[np.ndarray, np.ndarray]:
        """Posed (centre, frame) of the ellipsoid {centre + frame @ u : |u| <= 1}."""
        return self.point(centre), self.lin @ frame


# ---------------------------------------------------------------------------------------------- random case


class _Case:
    """Every random choice of one case, drawn in a fixed order (the grid never changes what is drawn)."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int, int], spacing):
        self.size = size
        in_plane, slice_spacing = rng.uniform(3.4, 4.2), rng.uniform(4.5, 6.0)

        # Whole body: position, in-plane rotation, patient size, outline, skeleton, diaphragm.
        self.shift = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-15, 15)])
        self.angle = rng.uniform(-4, 4)
        self.scale = rng.uniform(0.92, 1.03)
        self.half_width = 163 * rng.uniform(0.95, 1.03)
        self.half_ant, self.half_post = 125 * rng.uniform(0.92, 1.05), 115 * rng.uniform(0.95, 1.05)
        self.fat, self.muscle = rng.uniform(8, 26), rng.uniform(7, 12)
        self.wobble, self.wobble_phase = rng.uniform(0.01, 0.035, 2), rng.uniform(0, 2 * math.pi, 2)
        self.spine_dy = rng.uniform(-5, 5)
        self.pitch, self.disc_phase = rng.uniform(28, 34), rng.uniform(0, 34)
        self.dome_right = rng.uniform(142, 158)
        self.dome_left = self.dome_right - rng.uniform(4, 14)
        self.iliac_crest = rng.uniform(-112, -95)
        if spacing is None:
            # Like a scanner operator, widen the field of view (within the in-plane range) until the body fits.
            reach = 20 + max(self.half_width * (1 + self.wobble[0]) * self.scale + abs(self.shift[0]),
                             max(self.half_ant, self.half_post) * (1 + self.wobble[1]) * self.scale
                             + abs(self.shift[1]))
            in_plane = round(float(np.clip(max(in_plane, 2 * reach / (min(size[:2]) - 1)), 3.4, 4.2)), 3)
            spacing = (in_plane, in_plane, round(float(slice_spacing), 3))
        self.spacing = tuple(float(s) for s in spacing)

        # Intensities (HU). Soft-tissue organs share one per-case base, so their ranges overlap.
        base = rng.uniform(40, 62)
        self.hu = {
            "fat": rng.uniform(-120, -85), "muscle": rng.uniform(40, 60), "bowel": rng.uniform(10, 45),
            "bone": rng.uniform(180, 320), "cortex": rng.uniform(450, 800), "disc": rng.uniform(60, 100),
            "csf": rng.uniform(0, 20), "lung": rng.uniform(-880, -800), "heart": rng.uniform(90, 150),
            "gas": rng.uniform(-950, -850), "stool": rng.uniform(-120, -40),
            "stomach_fluid": rng.uniform(0, 25), "duodenal_fluid": rng.uniform(0, 30),
            "liver": base + rng.uniform(0, 7), "spleen": base + rng.uniform(-2, 6),
            "pancreas": base + rng.uniform(-6, 2), "kidney": base + rng.uniform(6, 18),
            "stomach": base + rng.uniform(-8, 6), "duodenum": base + rng.uniform(-8, 6),
            "esophagus": base + rng.uniform(-10, 4), "adrenal": base + rng.uniform(-12, 2),
            "aorta": rng.uniform(125, 180), "ivc": rng.uniform(110, 170), "gallbladder": rng.uniform(0, 20),
        }
        self.medulla_drop = rng.uniform(8, 18)
        self.bowel_threshold, self.bowel_gas_threshold = rng.uniform(-0.4, 0.5), rng.uniform(1.9, 2.4)
        self.colon_gas_threshold = rng.uniform(-0.2, 1.2)
        self.stomach_gas_level, self.stomach_wall = rng.uniform(-55, -28), rng.uniform(3.5, 6.0)
        self.noise_sigma, self.bias_amplitude = rng.uniform(12, 25), rng.uniform(4, 10)
        self.displacement_amplitude = rng.uniform(3, 7)

        # Organ poses (translation mm, scale fraction, rotation deg); attached structures follow their host.
        self.liver = _Pose(rng, (-45, -20, 80), 10, 0.12, 6)
        self.gallbladder = _Pose(rng, (-48, -52, 28), 4, 0.12, 8)
        self.spleen = _Pose(rng, (92, 40, 80), 10, 0.12, 6)
        self.kidney_right = _Pose(rng, (-70, 45, -8), 10, 0.10, 6)
        self.kidney_left = _Pose(rng, (70, 45, 8), 10, 0.10, 6)
        self.adrenal_right = _Pose(rng, (-42, 30, 60), 3, 0.06, 8)
        self.adrenal_left = _Pose(rng, (38, 28, 46), 3, 0.06, 8)
        self.stomach = _Pose(rng, (45, -30, 70), 10, 0.12, 6)
        self.esophagus = _Pose(rng, (15, -10, 150), 4, 0.10, 3)
        self.gut = _Pose(rng, (-15, -15, 10), 8, 0.10, 6)  # pancreas and duodenum together
        self.aorta = _Pose(rng, (8, 0, 0), 4, 0.08, 1.5)
        self.ivc = _Pose(rng, (-24, 8, 0), 4, 0.08, 1.5)
        self.colon = _Pose(rng, (0, -30, -60), 10, 0.06, 4)
        # Independent streams for the fields, so their sizes cannot shift any other draw.
        self.field_rngs = [np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, 8)]

    def spine_y(self, z):
        """y (mm) of the vertebral-body centre at height z: slightly more anterior lower down (lordosis)."""
        return 30 + self.spine_dy + 0.04 * z

    def dome(self, x, y):
        """Height (mm) of the diaphragm above (x, y): two domes, lowest in the posterior recesses."""
        top = np.where(x < 0, _F32(self.dome_right), _F32(self.dome_left))
        return top - ((np.abs(x) - 65) ** 2 + y * y) / _F32(300) - _F32(0.3) * np.maximum(y, 0)


# ---------------------------------------------------------------------------------------------- painting


class _Builder:
    """Voxel grid, warped anatomical coordinates of every voxel, and the image/label being painted."""

    def __init__(self, case: _Case):
        self.size, self.spacing = case.size, np.asarray(case.spacing)
        self.origin, self.axes = _grid_axes(case.size, case.spacing)
        self.shift, self.scale = case.shift, case.scale
        c, s = math.cos(math.radians(case.angle)), math.sin(math.radians(case.angle))
        self.rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        disp = [_F32(case.displacement_amplitude) * _smooth_field(r, self.axes, 60.0, True)
                for r in case.field_rngs[:3]]
        self.margin = float(max(np.abs(d).max() for d in disp)) + 1.0
        # Anatomical = rotate(physical - shift) / scale, then displaced: each voxel samples the anatomy at X, Y, Z.
        xp = ((self.axes[0] - self.shift[0]) / self.scale).astype(_F32)
        yp = ((self.axes[1] - self.shift[1]) / self.scale).astype(_F32)
        zp = ((self.axes[2] - self.shift[2]) / self.scale + _Z_CENTRE).astype(_F32)
        self.X = (_F32(c) * xp[None, :] - _F32(s) * yp[:, None])[None] + disp[0]
        self.Y = (_F32(s) * xp[None, :] + _F32(c) * yp[:, None])[None] + disp[1]
        self.Z = zp[:, None, None] + disp[2]
        self.texture = _smooth_field(case.field_rngs[3], self.axes, 2.6 * float(self.spacing.min()), False)
        shape = (self.size[2], self.size[1], self.size[0])
        self.img = np.full(shape, -1000.0, _F32)
        self.lab = np.zeros(shape, np.uint8)
        self.allowed = np.zeros(shape, bool)  # where organs may be: the cavity minus skeleton and muscles

    def box(self, lo, hi):
        """Voxel slices (z, y, x) covering the anatomical box [lo, hi] (mm), or None when it misses the grid."""
        lo = np.asarray(lo, float) - self.margin
        hi = np.asarray(hi, float) + self.margin
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        corners[:, 2] -= _Z_CENTRE
        phys = corners @ self.rot * self.scale + self.shift  # row vectors: @ rot applies rot.T
        first = np.clip(np.floor((phys.min(0) - self.origin) / self.spacing).astype(int), 0, self.size)
        last = np.clip(np.ceil((phys.max(0) - self.origin) / self.spacing).astype(int) + 1, 0, self.size)
        if np.any(last <= first):
            return None
        return tuple(slice(int(first[i]), int(last[i])) for i in (2, 1, 0))

    def coords(self, sl):
        return self.X[sl], self.Y[sl], self.Z[sl]

    def ellipsoid_box(self, centre, frame):
        half = np.sqrt((np.asarray(frame) ** 2).sum(axis=1))
        return self.box(np.asarray(centre) - half, np.asarray(centre) + half)

    def ellipsoid_r2(self, sl, centre, frame) -> np.ndarray:
        """Squared normalised radius of the ellipsoid {centre + frame @ u : |u| <= 1} over the slices."""
        m = np.linalg.inv(frame).astype(_F32)
        X, Y, Z = self.coords(sl)
        d = (X - _F32(centre[0]), Y - _F32(centre[1]), Z - _F32(centre[2]))
        r2 = 0
        for row in m:
            q = row[0] * d[0] + row[1] * d[1] + row[2] * d[2]
            r2 = r2 + q * q
        return r2

    def tube(self, points, radii):
        """(slices, distance - radius) for spheres swept along a polyline; each segment only visits its own box."""
        points, radii = np.asarray(points, float), np.asarray(radii, float)
        sl = self.box((points - radii[:, None]).min(0), (points + radii[:, None]).max(0))
        if sl is None:
            return None, None
        f = np.full(tuple(s.stop - s.start for s in sl), np.inf, _F32)
        for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            r = max(ra, rb)
            seg = self.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if seg is None:
                continue
            seg = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(seg, sl))
            if any(s.stop <= s.start for s in seg):
                continue
            X, Y, Z = self.coords(seg)
            ab = (b - a).astype(_F32)
            dx, dy, dz = X - _F32(a[0]), Y - _F32(a[1]), Z - _F32(a[2])
            length2 = float(ab @ ab)
            if length2 > 1e-9:
                t = (dx * ab[0] + dy * ab[1] + dz * ab[2]) * _F32(1.0 / length2)
                np.clip(t, 0.0, 1.0, out=t)
                dx -= t * ab[0]
                dy -= t * ab[1]
                dz -= t * ab[2]
                rad = _F32(ra) + t * _F32(rb - ra)
            else:
                rad = _F32(ra)
            local = f[tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(seg, sl))]
            np.minimum(local, np.sqrt(dx * dx + dy * dy + dz * dz) - rad, out=local)
        return sl, f

    def below_diaphragm(self, sl, case: _Case) -> np.ndarray:
        return self.Z[sl] < case.dome(self.X[sl], self.Y[sl])

    def paint(self, sl, mask, value: int, hu: float, texture_amplitude: float) -> np.ndarray:
        """Label `value` with intensity hu (+ texture) where mask, restricted to the allowed region."""
        mask &= self.allowed[sl]
        self.lab[sl][mask] = value
        self.img[sl][mask] = _F32(hu) + _F32(texture_amplitude) * self.texture[sl][mask]
        return mask


def _paint_body(b: _Builder, case: _Case) -> None:
    """Body wall, abdominal background, ribs, spine and muscles, lung bases and heart, iliac wings, colon."""
    hu, X, Y, Z, texture, img = case.hu, b.X, b.Y, b.Z, b.texture, b.img

    # Outline (ellipse, flatter behind, varying along z): subcutaneous fat, muscle wall, then the cavity.
    a = _F32(case.half_width) * (1 + _F32(case.wobble[0]) * np.sin(Z * _F32(2 * math.pi / 300)
                                                                    + _F32(case.wobble_phase[0])))
    bb = np.where(Y < 0, _F32(case.half_ant), _F32(case.half_post)) * (
        1 + _F32(case.wobble[1]) * np.sin(Z * _F32(2 * math.pi / 260) + _F32(case.wobble_phase[1])))
    x2, y2 = X * X, Y * Y
    body = x2 / (a * a) + y2 / (bb * bb) < 1
    a -= _F32(case.fat)
    bb -= _F32(case.fat)
    under_fat = x2 / (a * a) + y2 / (bb * bb) < 1
    a -= _F32(case.muscle)
    bb -= _F32(case.muscle)
    cavity = x2 / (a * a) + y2 / (bb * bb) < 1
    del a, bb, x2, y2

    # Cavity background: mesenteric fat and bowel loops (a smooth random field) with a few gas pockets;
    # bowel thins out posteriorly, leaving the retroperitoneum (around kidneys and great vessels) mostly fat.
    clutter = _smooth_field(case.field_rngs[4], b.axes, 16.0, True)
    clutter -= _F32(0.03) * np.maximum(Y + 10, 0)
    gas = _smooth_field(case.field_rngs[5], b.axes, 16.0, True) > case.bowel_gas_threshold
    bowel = _F32(0.5) * (1 + np.tanh(_F32(2.5) * (clutter - _F32(case.bowel_threshold))))
    inside = _F32(hu["fat"]) + _F32(hu["bowel"] - hu["fat"]) * bowel + _F32(6) * texture
    inside[gas & (bowel > 0.5) & (Y < 0)] = hu["gas"]
    img[body] = _F32(hu["fat"]) + _F32(5) * texture[body]
    img[under_fat] = _F32(hu["muscle"]) + _F32(4) * texture[under_fat]
    img[cavity] = inside[cavity]
    del clutter, gas, bowel, inside

    # Ribs: oblique bands in the muscle wall above the costal margin (not at the anterior midline).
    wall = under_fat & ~cavity
    wx, wy, wz = X[wall], Y[wall], Z[wall]
    costal = wz > -25 + 0.9 * np.maximum(-wy, 0) + 0.5 * np.maximum(40 - np.abs(wx), 0)
    ribs = costal & (np.cos((wz + _F32(0.45) * (115 - wy)) * _F32(2 * math.pi / 38)) > 0.72)
    wall_values = img[wall]
    wall_values[ribs] = hu["cortex"] * 0.7
    img[wall] = wall_values
    del wall, wx, wy, wz, costal, ribs, wall_values

    allowed = b.allowed
    allowed |= cavity

    # Vertebral column (bodies, discs, canal, arches, processes), paraspinal muscles, psoas.
    sl = b.box((-100, -20, -1e4), (100, 130, 1e4))
    if sl is not None:
        Xs, Ys, Zs = b.coords(sl)
        dy = Ys - _F32(case.spine_y(0)) - _F32(0.04) * Zs
        ax = np.abs(Xs)
        phase = ((Zs - _F32(case.disc_phase)) / _F32(case.pitch)) % 1
        disc = phase < 0.18
        body_r2 = (Xs / _F32(21)) ** 2 + (dy / _F32(16)) ** 2
        vertebra = body_r2 < 1
        canal_r2 = (Xs / _F32(9)) ** 2 + ((dy - 25) / _F32(9.5)) ** 2
        canal = canal_r2 < 1
        bone = (canal_r2 < 2.6) & ~canal & (dy > 14) & ~disc  # arch
        bone |= (ax < 4.5) & (dy > 30) & (dy < 62) & (phase > 0.25) & (phase < 0.85)  # spinous process
        bone |= (np.abs(dy - 22) < 4.5) & (ax < 42) & (phase > 0.35) & (phase < 0.65)  # transverse processes
        muscle = (((ax - 34) / _F32(26)) ** 2 + ((dy - 55) / _F32(30)) ** 2 < 1) & under_fat[sl]
        r_psoas = np.clip(_F32(3) + (20 - Zs) * _F32(0.14), 0, 20)
        muscle |= (ax - (22 + 0.8 * r_psoas)) ** 2 + ((dy - 6) * _F32(1.1)) ** 2 < r_psoas * r_psoas
        img_s = img[sl]
        img_s[muscle] = hu["muscle"]
        img_s[vertebra] = np.where(body_r2[vertebra] > 0.7, _F32(hu["cortex"]), _F32(hu["bone"]))
        img_s[vertebra & disc] = hu["disc"]
        img_s[bone] = hu["cortex"] * 0.8
        img_s[canal] = hu["csf"]
        allowed[sl] &= ~(vertebra | canal | bone | muscle)

    # Thorax above the diaphragm: lung bases, heart, mediastinal fat.
    sl = b.box((-200, -200, min(case.dome_left, case.dome_right) - 110), (200, 200, 1e4))
    if sl is not None:
        Xt, Yt, Zt = b.coords(sl)
        thorax = cavity[sl] & (Zt > case.dome(Xt, Yt))
        heart = ((Xt - 20) / _F32(68)) ** 2 + ((Yt + 60) / _F32(42)) ** 2 + (
            (Zt - _F32(case.dome_left + 55)) / _F32(62)) ** 2 < 1
        mediastinum = (np.abs(Xt - 5) < 30) & (Yt > -50) & (Yt < 45)
        img_t = img[sl]
        img_t[thorax] = _F32(hu["lung"]) + _F32(25) * texture[sl][thorax]
        img_t[thorax & mediastinum] = hu["fat"] + 20
        img_t[thorax & heart] = hu["heart"]

    # Iliac wings with iliacus and gluteal muscles in the lowest slices.
    sl = b.box((-200, -100, -1e4), (200, 200, -60))
    if sl is not None:
        Xp, Yp, Zp = b.coords(sl)
        ax = np.abs(Xp)
        pelvis = (Zp < _F32(case.iliac_crest) - _F32(0.002) * (ax - 100) ** 2) & (Yp > -25) & (ax > 42)
        rr = np.sqrt((ax - 35) ** 2 + (Yp - 45) ** 2)
        wing = pelvis & (np.abs(rr - 72) < 4.5) & (Yp < 80)
        muscle = pelvis & ((rr > 76.5) | ((rr > 60) & (rr < 67.5))) & under_fat[sl]
        img_p = img[sl]
        img_p[muscle] = hu["muscle"]
        img_p[wing] = np.where(np.abs(rr[wing] - 72) > 2.5, _F32(hu["cortex"]), _F32(hu["bone"]))
        allowed[sl] &= ~(wing | muscle)

    # Colon (unlabelled): ascending, transverse, descending and sigmoid, with mottled stool and gas.
    pts, rad = _catmull_rom(
        case.colon.point([(-85, -15, -150), (-88, -22, -60), (-85, -35, -15), (-55, -75, -10), (0, -88, -22),
                          (55, -70, -5), (92, -25, 22), (100, 5, -20), (96, 10, -100), (60, -30, -150)]),
        [24, 22, 21, 19, 18, 18, 17, 16, 15, 14])
    sl, f = b.tube(pts, rad)
    if sl is not None:
        wall = (f < 0) & allowed[sl] & b.below_diaphragm(sl, case)
        lumen = wall & (f < -3.0)
        img_c = img[sl]
        img_c[wall] = _F32(hu["muscle"] - 10) + _F32(4) * texture[sl][wall]
        img_c[lumen] = np.where(texture[sl][lumen] > case.colon_gas_threshold, _F32(hu["gas"]),
                                _F32(hu["stool"]) + _F32(40) * texture[sl][lumen])


def _paint_organs(b: _Builder, case: _Case) -> None:
    """The 13 organs, large ones first: later ones win where shapes overlap."""
    hu = case.hu

    # Liver: right lobe and a thinner left lobe across the midline, moulded by the wall and the diaphragm.
    p = case.liver
    lobes = [p.ellipsoid((-62, -8, 78), _rot(0, 18, 0) @ np.diag((80, 86, 76))),
             p.ellipsoid((0, -50, 95), _rot(0, -10, 10) @ np.diag((62, 32, 36)))]
    boxes = [b.ellipsoid_box(*e) for e in lobes]
    if any(boxes):
        sl = tuple(slice(min(s[i].start for s in boxes if s), max(s[i].stop for s in boxes if s)) for i in range(3))
        mask = (b.ellipsoid_r2(sl, *lobes[0]) < 1) | (b.ellipsoid_r2(sl, *lobes[1]) < 1)
        b.paint(sl, mask & b.below_diaphragm(sl, case), _ID["liver"], hu["liver"], 4)

    # Spleen: crescent against the posterolateral wall (an ellipsoid minus a medial one at the hilum).
    normal = np.array([math.cos(math.radians(40)), math.sin(math.radians(40)), 0.0])
    up = np.array([0.0, -0.45, 1.0])
    up -= (up @ normal) * normal
    up /= np.linalg.norm(up)
    frame = np.column_stack([np.cross(normal, up), normal, up])  # width, thickness, length
    outer = case.spleen.ellipsoid((92, 40, 80), frame @ np.diag((38, 22, 58)))
    inner = case.spleen.ellipsoid(np.array((92, 40, 80)) - 26 * normal, frame @ np.diag((28, 14, 42)))
    sl = b.ellipsoid_box(*outer)
    if sl is not None:
        mask = (b.ellipsoid_r2(sl, *outer) < 1) & (b.ellipsoid_r2(sl, *inner) >= 1)
        b.paint(sl, mask & b.below_diaphragm(sl, case), _ID["spleen"], hu["spleen"], 4)

    # Kidneys: upper pole medial and posterior, hilum (renal sinus fat) anteromedial, darker medulla.
    for p, centre, side, name in ((case.kidney_right, (-70, 45, -8), 1, "kidney_right"),
                                  (case.kidney_left, (70, 45, 8), -1, "kidney_left")):
        r0 = _rot(-10, 12 * side, -35 * side)
        kidney = p.ellipsoid(centre, r0 @ np.diag((26, 20, 55)))
        sinus = p.ellipsoid(np.asarray(centre) + r0 @ np.array((side * 22.0, 0, 0)), r0 @ np.diag((12, 9, 24)))
        sl = b.ellipsoid_box(*kidney)
        if sl is not None:
            r2 = b.ellipsoid_r2(sl, *kidney)
            mask = b.paint(sl, (r2 < 1) & (b.ellipsoid_r2(sl, *sinus) >= 1), _ID[name], hu["kidney"], 5)
            b.img[sl][mask & (r2 < 0.4)] -= _F32(case.medulla_drop)

    # Stomach: J-shaped tube from the fundus under the left dome to the pylorus right of the midline; the
    # label covers wall and contents; gas floats anteriorly (patient supine) over fluid.
    p = case.stomach
    centre_line = [(58, 12, 112), (66, -12, 92), (68, -32, 65), (55, -50, 40), (28, -62, 28), (0, -60, 30),
                   (-22, -48, 34)]
    pts, rad = _catmull_rom(p.point(centre_line), np.array([32, 33, 30, 26, 21, 16, 11]) * p.radius_scale)
    cardia, pylorus = p.point((35, -2, 104)), p.point(centre_line[-1])
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = b.paint(sl, (f < 0) & b.below_diaphragm(sl, case), _ID["stomach"], hu["stomach"], 5)
        lumen = mask & (f < -case.stomach_wall)
        img_s = b.img[sl]
        img_s[lumen] = _F32(hu["stomach_fluid"]) + _F32(6) * b.texture[sl][lumen]
        img_s[lumen & (b.Y[sl] < _F32(p.shift[1] + case.stomach_gas_level))] = hu["gas"]

    # Duodenum: C loop from the pylorus around the pancreatic head to the duodenojejunal flexure.
    p = case.gut
    loop = p.point([(-40, -35, 38), (-55, -15, 30), (-60, -8, 5), (-57, -8, -20), (-40, -20, -36), (-10, -28, -40),
                    (22, -26, -32), (35, -22, -8), (38, -25, 10)])
    pts, rad = _catmull_rom(np.vstack([pylorus, loop]),
                            np.array([11, 13, 12, 12, 12, 11, 11, 11, 10, 10]) * p.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = b.paint(sl, f < 0, _ID["duodenum"], hu["duodenum"], 5)
        b.img[sl][mask & (f < -3.0)] = hu["duodenal_fluid"]

    # Pancreas: head in the duodenal C, neck and body anterior to the aorta, tail towards the splenic hilum.
    pts, rad = _catmull_rom(p.point([(-36, -18, -5), (-32, -20, 15), (-5, -26, 28), (30, -16, 35), (60, 0, 42),
                                     (84, 14, 50)]),
                            np.array([15, 15, 11, 11, 10, 9]) * p.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        b.paint(sl, f < 0, _ID["pancreas"], hu["pancreas"], 9)

    # Esophagus: down the posterior mediastinum in front of the aorta, ending at the cardia.
    p = case.esophagus
    pts, rad = _catmull_rom(np.vstack([p.point([(2, -10, 260), (4, -12, 180), (16, -18, 140), (24, -14, 118)]),
                                       cardia]),
                            np.array([9, 9, 9, 9.5, 10]) * p.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        b.paint(sl, (f < 0) & (b.lab[sl] != _ID["stomach"]), _ID["esophagus"], hu["esophagus"], 4)

    # Inferior vena cava: right of the spine, through the back of the liver towards the heart.
    p = case.ivc
    z = np.array([-120, -60, 0, 50, 100, 150, 200, 260], float)
    line = np.column_stack([[-20, -22, -24, -26, -24, -18, -8, 0],
                            case.spine_y(z) - [26, 25, 22, 19, 16, 14, 20, 30], z])
    sl, f = b.tube(*_catmull_rom(p.point(line), np.array([10, 11, 11, 12, 13, 13, 13, 13]) * p.radius_scale))
    if sl is not None:
        b.paint(sl, f < 0, _ID["inferior_vena_cava"], hu["ivc"], 8)
    confluence = p.point(line[0])

    # Aorta: in front of and left of the spine, from the thorax to the bifurcation (~L4).
    p = case.aorta
    z = np.array([-105, -60, 0, 60, 120, 180, 260], float)
    line = np.column_stack([[4, 6, 8, 9, 10, 14, 18], case.spine_y(z) - [30, 30, 30, 30, 28, 26, 26], z])
    sl, f = b.tube(*_catmull_rom(p.point(line), np.array([10, 11, 12, 12.5, 12.5, 13, 13]) * p.radius_scale))
    if sl is not None:
        b.paint(sl, f < 0, _ID["aorta"], hu["aorta"], 6)

    # Common iliac arteries and veins: contrast-enhanced like their parents, unlabelled.
    for start, r, value in ((p.point(line[0]), 6.5, hu["aorta"]), (confluence, 7.5, hu["ivc"])):
        for side in (-1, 1):
            sl, f = b.tube([start, start + (side * 45, 10, -80)], [r, r])
            if sl is not None:
                b.img[sl][(f < 0) & b.allowed[sl] & (b.lab[sl] == 0)] = value

    # Gallbladder: under the liver (moves with it), fundus pointing anterior-inferior.
    gallbladder = case.gallbladder.ellipsoid(case.liver.point((-48, -52, 28)),
                                             _rot(-40, 10, 0) @ np.diag((14, 14, 36)))
    sl = b.ellipsoid_box(*gallbladder)
    if sl is not None:
        b.paint(sl, b.ellipsoid_r2(sl, *gallbladder) < 1, _ID["gallbladder"], hu["gallbladder"], 2)

    # Adrenal glands: inverted-Y, above and medial to the upper poles (they move with their kidney).
    for host, p, centre, name in ((case.kidney_right, case.adrenal_right, (-42, 30, 60), "adrenal_gland_right"),
                                  (case.kidney_left, case.adrenal_left, (38, 28, 46), "adrenal_gland_left")):
        limbs = [p.point(host.point(np.asarray(centre) + d)) for d in ((-7, 8, -12), (0, -6, 13), (7, 9, -12))]
        r = 6.5 * p.radius_scale * host.radius_scale
        sl, f = b.tube(limbs, [0.85 * r, r, 0.85 * r])
        if sl is not None:
            b.paint(sl, f < 0, _ID[name], hu["adrenal"], 3)


def _acquire(b: _Builder, case: _Case) -> np.ndarray:
    """Scanner effects on the painted volume: partial volume blur, smooth bias field, noise; int16 HU."""
    img = _smooth3(b.img, (0.08, 0.12, 0.12))
    img += _F32(case.bias_amplitude) * np.tanh(_smooth_field(case.field_rngs[6], b.axes, 150.0, True))
    img += _F32(case.noise_sigma) * case.field_rngs[7].standard_normal(img.shape, _F32)
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.int16)


# ----------------------------------------------------------------------------------------------
# A ready case store of phantoms


def write_phantom_store(
    out: str | os.PathLike[str],
    cases: int = 20,
    labeled: int = 4,
    test: int = 4,
    seed: int = 0,
    size: tuple[int, int, int] = (96, 96, 64),
    progress: Callable[[str], None] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> CaseStore:
    """Write a case store of phantoms: ``labeled`` of the ``cases`` training cases with labels, the
    rest unlabeled, plus ``test`` labeled test cases. The generator's labels of the unlabeled
    cases go to ``phantomTruth/`` (never read by training), to measure pseudo-labels against and
    to simulate an annotator's corrections. Case i is ``generate_phantom(seed * 100_000 + i)``.
    """
    from .errors import GuidedSegError
    from .imageio import write_label_map
    from .store import CaseStore

    if cases < 1 or not 0 <= labeled <= cases or test < 0:
        raise GuidedSegError(f"need cases >= 1, 0 <= labeled <= cases and test >= 0 "
                             f"(got cases={cases}, labeled={labeled}, test={test})")
    store = CaseStore.create(out, FLARE22_LABELS, name="guidedseg-phantoms", modality="CT",
                             description=f"Synthetic abdominal CT phantoms (GuidedSeg generator, seed {seed}), "
                                         "13 FLARE22 organs.")
    for index in range(cases + test):
        phantom = generate_phantom(seed * 100_000 + index, size=size, spacing=spacing)
        case_id = f"phantom_{index:04d}"
        if index < labeled:
            store.add_labeled(phantom.image, phantom.label, case_id, source=f"phantom generator seed {seed}")
        elif index < cases:
            store.add_unlabeled(phantom.image, case_id)
            write_label_map(phantom.label, store.root / "phantomTruth" / f"{case_id}.nii.gz")
        else:
            store.add_test(phantom.image, phantom.label, case_id)
        if progress:
            progress(f"{case_id}: {store.case(case_id).kind}")
    return store
