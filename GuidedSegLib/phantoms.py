"""Deterministic synthetic abdominal CT volumes with the 13 FLARE22 organs (the embedded default data set).

The anatomy is modelled in millimetres in patient LPS coordinates (+x left, +y posterior, +z superior),
so any grid size or spacing samples the same patient. Organs are implicit shapes (ellipsoids and tubes swept
along smooth centre lines) with per-case random pose, a smooth random deformation of the whole body, and
overlapping intensity ranges, so intensity alone does not separate them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .labels import FLARE22_LABELS

__all__ = ["Phantom", "generate_phantom"]

_ID = {name: value for value, name in FLARE22_LABELS.items()}

# Anatomical frame: x = 0 on the midline, y = 0 at the middle of the body, z = 0 at about L1/L2 (renal hila).
# The volume centre sits this high, so a default field of view runs from the lung bases to the iliac crests.
_Z_CENTRE = 25.0
# Random fields that shape the anatomy live on a fixed lattice in physical space (not on the voxel grid),
# so one seed gives the same patient at any resolution.
_LATTICE_HALF_EXTENT = 420.0


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume (int16 HU) and its FLARE22 label map (uint8, 0..13) on the same grid."""

    image: sitk.Image
    label: sitk.Image


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    ax, ay, az = (math.radians(a) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_weights(coords: np.ndarray, knots: np.ndarray, cell: float) -> np.ndarray:
    w = np.exp(-0.5 * ((coords[:, None] - knots[None, :]) / (0.6 * cell)) ** 2)
    # Unit L2 norm per row makes the tensor-product field unit-variance everywhere.
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True) + 1e-30)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, axes: list[np.ndarray], cell: float, fixed_lattice: bool) -> np.ndarray:
    """Unit-variance Gaussian random field, smooth on the scale `cell` mm, sampled at axes (x, y, z) -> (z, y, x).

    fixed_lattice: draw the knot values on a lattice fixed in physical space (resolution independent);
    otherwise only knots around the grid are drawn (cheaper, for image texture).
    """
    fixed_lattice = fixed_lattice and all(
        c[0] > -_LATTICE_HALF_EXTENT + 3 * cell and c[-1] < _LATTICE_HALF_EXTENT - 3 * cell for c in axes)
    mats, spans = [], []
    for c in axes:
        if fixed_lattice:
            knots = -_LATTICE_HALF_EXTENT + cell * np.arange(int(math.ceil(2 * _LATTICE_HALF_EXTENT / cell)) + 1)
            lo = int(np.searchsorted(knots, c[0] - 3 * cell))
            hi = int(np.searchsorted(knots, c[-1] + 3 * cell))
        else:
            knots = c[0] - 2 * cell + cell * np.arange(int(math.ceil((c[-1] - c[0]) / cell)) + 5)
            lo, hi = 0, len(knots)
        mats.append(_axis_weights(c, knots[lo:hi], cell))
        spans.append((lo, hi, len(knots)))
    wx, wy, wz = mats
    (x0, x1, nx), (y0, y1, ny), (z0, z1, nz) = spans
    # The whole lattice is drawn so that the values at a given place do not depend on the grid.
    g = rng.standard_normal((nz, ny, nx), dtype=np.float32)[z0:z1, y0:y1, x0:x1]
    f = g @ wx.T  # (kz, ky, nx)
    f = wy @ f  # (kz, ny, nx)
    return (wz @ f.reshape(f.shape[0], -1)).reshape(len(axes[2]), len(axes[1]), len(axes[0]))


def _smooth3(a: np.ndarray, weights: tuple[float, float, float]) -> np.ndarray:
    """Separable 3-tap blur [w, 1-2w, w] per axis (z, y, x), edges replicated: a cheap partial-volume effect."""
    for axis, w in enumerate(weights):
        if w <= 0 or a.shape[axis] < 2:
            continue
        out = a * np.float32(1 - 2 * w)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        out[hi] += np.float32(w) * a[lo]
        out[lo] += np.float32(w) * a[hi]
        first, last = [slice(None)] * 3, [slice(None)] * 3
        first[axis], last[axis] = slice(0, 1), slice(-1, None)
        out[tuple(first)] += np.float32(w) * a[tuple(first)]
        out[tuple(last)] += np.float32(w) * a[tuple(last)]
        a = out
    return a


def _catmull_rom(points: np.ndarray, radii: np.ndarray, per_segment: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Densify a polyline into a smooth curve through its points (radii interpolated linearly)."""
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out, rad = [], []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
        rad.append(radii[i - 1] + (radii[i] - radii[i - 1]) * t[:, 0])
    return np.vstack(out + [points[-1:]]), np.concatenate(rad + [radii[-1:]])


def _grid_axes(size, spacing) -> tuple[np.ndarray, list[np.ndarray]]:
    """Origin and physical voxel coordinates per axis (x, y, z) of a grid centred on the physical origin."""
    origin = -0.5 * (np.asarray(size) - 1) * np.asarray(spacing, float)
    return origin, [origin[i] + spacing[i] * np.arange(size[i]) for i in range(3)]


class _Pose:
    """Similarity-like transform of an organ about its centre: x -> centre + shift + lin @ (x - centre)."""

    def __init__(self, centre, lin=None, shift=None):
        self.centre = np.asarray(centre, float)
        self.lin = np.eye(3) if lin is None else np.asarray(lin, float)
        self.shift = np.zeros(3) if shift is None else np.asarray(shift, float)
        self.radius_scale = float(abs(np.linalg.det(self.lin)) ** (1 / 3))

    @classmethod
    def random(cls, rng, centre, shift_mm, scale_frac, rot_deg) -> _Pose:
        shift = rng.uniform(-shift_mm, shift_mm, 3)
        scale = 1 + rng.uniform(-scale_frac, scale_frac) + rng.uniform(-0.04, 0.04, 3)
        return cls(centre, _rot(*rng.uniform(-rot_deg, rot_deg, 3)) @ np.diag(scale), shift)

    def point(self, p) -> np.ndarray:
        p = np.asarray(p, float)
        return self.centre + self.shift + (p - self.centre) @ self.lin.T

    def ellipsoid(self, centre, frame) -> tuple[np.ndarray, np.ndarray]:
        return self.point(centre), self.lin @ frame


class _Builder:
    """Voxel grid, warped anatomical coordinates and the image/label being painted."""

    def __init__(self, size, spacing, shift, angle, scale, disp_fields):
        self.size, self.spacing = size, np.asarray(spacing, float)
        self.origin, self.axes = _grid_axes(size, spacing)
        self.shift, self.scale = np.asarray(shift, float), scale
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        self.rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        xp = ((self.axes[0] - shift[0]) / scale).astype(np.float32)
        yp = ((self.axes[1] - shift[1]) / scale).astype(np.float32)
        zp = ((self.axes[2] - shift[2]) / scale + _Z_CENTRE).astype(np.float32)
        dx, dy, dz = disp_fields
        self.X = (np.float32(c) * xp[None, :] - np.float32(s) * yp[:, None])[None] + dx
        self.Y = (np.float32(s) * xp[None, :] + np.float32(c) * yp[:, None])[None] + dy
        self.Z = zp[:, None, None] + dz
        self.margin = float(max(np.abs(d).max() for d in disp_fields)) + 1.0
        shape = (size[2], size[1], size[0])
        self.img = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)

    def box(self, lo, hi):
        """Voxel slices (z, y, x) covering the anatomical box [lo, hi] (mm), or None when it is off the grid."""
        lo = np.asarray(lo, float) - self.margin
        hi = np.asarray(hi, float) + self.margin
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        corners[:, 2] -= _Z_CENTRE
        phys = corners @ self.rot * self.scale + self.shift  # rot.T applied to row vectors
        first = np.floor((phys.min(0) - self.origin) / self.spacing).astype(int)
        last = np.ceil((phys.max(0) - self.origin) / self.spacing).astype(int) + 1
        first = np.clip(first, 0, self.size)
        last = np.clip(last, 0, self.size)
        if np.any(last <= first):
            return None
        return tuple(slice(int(first[i]), int(last[i])) for i in (2, 1, 0))

    def coords(self, sl):
        return self.X[sl], self.Y[sl], self.Z[sl]

    def ellipsoid_r2(self, sl, centre, frame) -> np.ndarray:
        """Squared normalised radius of the ellipsoid {centre + frame @ u : |u| <= 1} over the slices."""
        m = np.linalg.inv(frame).astype(np.float32)
        X, Y, Z = self.coords(sl)
        d = (X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2]))
        r2 = None
        for row in m:
            q = row[0] * d[0] + row[1] * d[1] + row[2] * d[2]
            r2 = q * q if r2 is None else r2 + q * q
        return r2

    @staticmethod
    def ellipsoid_bounds(centre, frame):
        half = np.sqrt((np.asarray(frame) ** 2).sum(axis=1))
        return np.asarray(centre) - half, np.asarray(centre) + half

    def tube(self, points, radii):
        """(slices, dist - radius) of spheres swept along a polyline; each segment only touches its own box."""
        points, radii = np.asarray(points, float), np.asarray(radii, float)
        sl = self.box((points - radii[:, None]).min(0), (points + radii[:, None]).max(0))
        if sl is None:
            return None, None
        shape = tuple(s.stop - s.start for s in sl)
        f = np.full(shape, np.inf, np.float32)
        for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            r = max(ra, rb)
            ssl = self.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if ssl is None:
                continue
            ssl = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(ssl, sl))
            if any(s.stop <= s.start for s in ssl):
                continue
            loc = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(ssl, sl))
            X, Y, Z = self.coords(ssl)
            ab = (b - a).astype(np.float32)
            dx, dy, dz = X - np.float32(a[0]), Y - np.float32(a[1]), Z - np.float32(a[2])
            length2 = float(ab @ ab)
            if length2 > 1e-9:
                t = (dx * ab[0] + dy * ab[1] + dz * ab[2]) * np.float32(1.0 / length2)
                np.clip(t, 0.0, 1.0, out=t)
                dx -= t * ab[0]
                dy -= t * ab[1]
                dz -= t * ab[2]
                rad = np.float32(ra) + t * np.float32(rb - ra)
            else:
                rad = np.float32(ra)
            val = np.sqrt(dx * dx + dy * dy + dz * dz) - rad
            np.minimum(f[loc], val, out=f[loc])
        return sl, f

    def paint(self, sl, mask, value, hu, texture=None, amplitude=0.0):
        """Set label `value` and intensity `hu` (+ amplitude * texture) where mask is true inside the slices."""
        self.lab[sl][mask] = value
        if texture is not None and amplitude:
            self.img[sl][mask] = np.float32(hu) + np.float32(amplitude) * texture[sl][mask]
        else:
            self.img[sl][mask] = hu


def _check_size(size) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in size)
        if any(int(v) != v for v in size):
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


def generate_phantom(
    seed: int,
    size: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] | None = None,
) -> Phantom:
    """Synthetic abdominal CT case number `seed` (same seed -> bit-identical arrays).

    size and spacing are (x, y, z) in SimpleITK order. spacing None -> drawn from the seed: anisotropic,
    in-plane ~3.4-4.2 mm, slices ~4.5-6 mm, so that a 96x96x64 volume covers a whole abdomen
    (body ~ 330 mm wide, ~240 mm anterior-posterior).
    """
    size = _check_size(size)
    if spacing is not None:
        spacing = _check_spacing(spacing)
    rng = np.random.default_rng(seed)

    # Drawn even when spacing is given, so the anatomy of a seed does not depend on the grid.
    in_plane = round(float(rng.uniform(3.4, 4.2)), 3)
    drawn_spacing = (in_plane, in_plane, round(float(rng.uniform(4.5, 6.0)), 3))
    spacing = drawn_spacing if spacing is None else spacing

    # Whole body: position, in-plane rotation, patient size, body outline.
    shift = (rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-15, 15))
    angle = rng.uniform(-4, 4)
    scale = rng.uniform(0.93, 1.04)
    half_width = 165 * rng.uniform(0.95, 1.03)
    half_ant, half_post = 125 * rng.uniform(0.92, 1.05), 115 * rng.uniform(0.95, 1.05)
    fat, muscle = rng.uniform(8, 26), rng.uniform(7, 12)
    wobble = rng.uniform(0.01, 0.035, 2), rng.uniform(0, 2 * math.pi, 2)
    spine_dy = rng.uniform(-5, 5)
    pitch, disc_phase = rng.uniform(28, 34), rng.uniform(0, 34)
    dome_right = rng.uniform(142, 158)
    dome_left = dome_right - rng.uniform(4, 14)
    iliac_crest = rng.uniform(-112, -95)

    # Intensities (HU). Soft organs share one per-case base, so their ranges overlap.
    base = rng.uniform(40, 62)
    hu = {
        "fat": rng.uniform(-120, -85), "muscle": rng.uniform(40, 60), "bowel": rng.uniform(10, 45),
        "bowel_threshold": rng.uniform(-0.4, 0.5), "gas_threshold": rng.uniform(1.9, 2.4),
        "bone": rng.uniform(180, 320), "cortex": rng.uniform(450, 800), "disc": rng.uniform(60, 100),
        "csf": rng.uniform(0, 20), "lung": rng.uniform(-880, -800), "heart": rng.uniform(90, 150),
        "liver": base + rng.uniform(0, 8), "spleen": base + rng.uniform(-4, 6),
        "pancreas": base + rng.uniform(-6, 2), "kidney": base + rng.uniform(6, 18),
        "medulla": rng.uniform(8, 18), "stomach": base + rng.uniform(-8, 6), "duodenum": base + rng.uniform(-8, 6),
        "esophagus": base + rng.uniform(-10, 4), "adrenal": base + rng.uniform(-12, 2),
        "aorta": rng.uniform(125, 180), "ivc": rng.uniform(110, 170), "gallbladder": rng.uniform(0, 20),
        "stool": rng.uniform(-120, -40), "fluid": rng.uniform(0, 25), "duodenal_fluid": rng.uniform(0, 30), "gas": rng.uniform(-950, -850),
    }
    noise_sigma = rng.uniform(12, 25)
    bias_amplitude = rng.uniform(5, 12)
    gas_level = rng.uniform(-55, -28)
    stomach_wall = rng.uniform(3.5, 6.0)
    colon_gas = rng.uniform(-0.2, 1.2)

    # Organ poses: translation +-10 mm, scale +-12 %, rotation +-6 deg; attached structures follow their host.
    liver = _Pose.random(rng, (-45, -20, 80), 10, 0.12, 6)
    gallbladder = _Pose.random(rng, (-48, -52, 28), 4, 0.15, 8)
    spleen = _Pose.random(rng, (92, 40, 80), 10, 0.12, 6)
    kidney_r = _Pose.random(rng, (-70, 45, -8), 10, 0.10, 6)
    kidney_l = _Pose.random(rng, (70, 45, 8), 10, 0.10, 6)
    adrenal_r = _Pose.random(rng, (-42, 30, 60), 3, 0.10, 8)
    adrenal_l = _Pose.random(rng, (36, 30, 45), 3, 0.10, 8)
    stomach = _Pose.random(rng, (45, -30, 70), 10, 0.12, 6)
    esophagus = _Pose.random(rng, (15, -10, 150), 4, 0.10, 3)
    gut = _Pose.random(rng, (-15, -15, 10), 8, 0.10, 6)  # pancreas + duodenum
    aorta = _Pose.random(rng, (8, 0, 0), 4, 0.08, 1.5)
    ivc = _Pose.random(rng, (-24, 8, 0), 4, 0.08, 1.5)
    colon = _Pose.random(rng, (0, -30, -60), 10, 0.06, 4)
    field_seeds = rng.integers(0, 2**63 - 1, 6)

    _, axes = _grid_axes(size, spacing)
    disp_amp = np.random.default_rng(field_seeds[0]).uniform(3, 7)
    disp = [np.float32(disp_amp) * _smooth_field(np.random.default_rng(s), axes, 60.0, True)
            for s in np.random.default_rng(field_seeds[0]).integers(0, 2**63 - 1, 3)]
    b = _Builder(size, spacing, shift, angle, scale, disp)
    X, Y, Z = b.X, b.Y, b.Z
    texture = _smooth_field(np.random.default_rng(field_seeds[1]), axes, 2.6 * min(spacing), False)

    # Body wall: skin/subcutaneous fat, muscle, then the abdominal cavity.
    a = np.float32(half_width) * (1 + np.float32(wobble[0][0]) * np.sin(Z * np.float32(2 * math.pi / 300)
                                                                           + np.float32(wobble[1][0])))
    bb = np.where(Y < 0, np.float32(half_ant), np.float32(half_post)) * (
        1 + np.float32(wobble[0][1]) * np.sin(Z * np.float32(2 * math.pi / 260) + np.float32(wobble[1][1])))
    x2, y2 = X * X, Y * Y
    body = x2 / (a * a) + y2 / (bb * bb) < 1
    a -= np.float32(fat)
    bb -= np.float32(fat)
    under_fat = x2 / (a * a) + y2 / (bb * bb) < 1
    a -= np.float32(muscle)
    bb -= np.float32(muscle)
    cavity = x2 / (a * a) + y2 / (bb * bb) < 1
    del a, bb, x2, y2

    clutter = _smooth_field(np.random.default_rng(field_seeds[2]), axes, 16.0, True)
    gas_field = _smooth_field(np.random.default_rng(field_seeds[3]), axes, 16.0, True)
    bowel = np.float32(0.5) * (1 + np.tanh(np.float32(2.5) * (clutter - np.float32(hu["bowel_threshold"]))))
    inside = np.float32(hu["fat"]) + np.float32(hu["bowel"] - hu["fat"]) * bowel + np.float32(6) * texture
    inside[(gas_field > hu["gas_threshold"]) & (bowel > 0.5)] = hu["gas"]
    img = b.img
    img[body] = np.float32(hu["fat"]) + np.float32(5) * texture[body]
    img[under_fat] = np.float32(hu["muscle"]) + np.float32(4) * texture[under_fat]
    img[cavity] = inside[cavity]
    del inside, bowel, clutter, gas_field

    # Ribs: oblique bands in the muscle wall above the costal margin.
    wall = under_fat & ~cavity
    wx, wy, wz = X[wall], Y[wall], Z[wall]
    costal = wz > np.float32(-25) + np.float32(0.9) * np.maximum(-wy, 0) + np.float32(0.5) * np.maximum(40 - np.abs(wx), 0)
    ribs = costal & (np.cos((wz + np.float32(0.45) * (115 - wy)) * np.float32(2 * math.pi / 38)) > 0.72)
    rib_values = img[wall]
    rib_values[ribs] = np.float32(hu["cortex"] * 0.7)
    img[wall] = rib_values
    del wall, wx, wy, wz, costal, ribs, rib_values

    # Spine, paraspinal muscles and psoas: behind/beside the cavity, never organ.
    allowed = cavity.copy()
    sl = b.box((-100, -20, -1e4), (100, 130, 1e4))
    if sl is not None:
        Xs, Ys, Zs = b.coords(sl)
        dy = Ys - (np.float32(30 + spine_dy) + np.float32(0.04) * Zs)
        ax_ = np.abs(Xs)
        phase = ((Zs - np.float32(disc_phase)) / np.float32(pitch)) % 1
        disc = phase < 0.18
        body_r2 = (Xs / np.float32(21)) ** 2 + (dy / np.float32(16)) ** 2
        vertebra = body_r2 < 1
        canal_r2 = (Xs / np.float32(9)) ** 2 + ((dy - 25) / np.float32(9.5)) ** 2
        canal = canal_r2 < 1
        arch = (canal_r2 < 2.6) & ~canal & (dy > 14) & ~disc
        spinous = (ax_ < 4.5) & (dy > 30) & (dy < 62) & (phase > 0.25) & (phase < 0.85)
        transverse = (np.abs(dy - 22) < 4.5) & (ax_ < 42) & (phase > 0.35) & (phase < 0.65)
        para = (((ax_ - 34) / np.float32(26)) ** 2 + ((dy - 55) / np.float32(30)) ** 2 < 1) & under_fat[sl]
        r_ps = np.clip(np.float32(5) + (40 - Zs) * np.float32(0.13), 0, 20)
        psoas = (ax_ - (22 + 0.8 * r_ps)) ** 2 + ((dy - 6) * np.float32(1.1)) ** 2 < r_ps * r_ps
        img_s = img[sl]
        img_s[para | psoas] = hu["muscle"]
        img_s[vertebra] = np.where(body_r2[vertebra] > 0.7, np.float32(hu["cortex"]), np.float32(hu["bone"]))
        img_s[vertebra & disc] = hu["disc"]
        img_s[arch | spinous | transverse] = hu["cortex"] * 0.8
        img_s[canal] = hu["csf"]
        allowed[sl] &= ~(vertebra | canal | arch | spinous | transverse | para | psoas)
        del Xs, Ys, Zs, dy, ax_, phase, disc, body_r2, vertebra, canal_r2, canal, arch, spinous, transverse, para
        del r_ps, psoas, img_s

    def dome(Xb, Yb):
        """Height of the diaphragm (mm) above each (x, y): two domes, lowest in the posterior recesses."""
        top = np.where(Xb < 0, np.float32(dome_right), np.float32(dome_left))
        return top - ((np.abs(Xb) - 65) ** 2 + Yb * Yb) / np.float32(300) - np.float32(0.3) * np.maximum(Yb, 0)

    # Thorax above the diaphragm: lung bases, heart, mediastinal fat.
    sl = b.box((-200, -200, min(dome_left, dome_right) - 110), (200, 200, 1e4))
    if sl is not None:
        Xt, Yt, Zt = b.coords(sl)
        thorax = cavity[sl] & (Zt > dome(Xt, Yt))
        heart = ((Xt - 20) / np.float32(68)) ** 2 + ((Yt + 60) / np.float32(42)) ** 2 + (
            (Zt - np.float32(dome_left + 55)) / np.float32(62)) ** 2 < 1
        media = (np.abs(Xt - 5) < 30) & (Yt > -50) & (Yt < 45)
        img_t = img[sl]
        img_t[thorax] = np.float32(hu["lung"]) + np.float32(25) * texture[sl][thorax]
        img_t[thorax & media] = hu["fat"] + 20
        img_t[thorax & heart] = hu["heart"]
        del Xt, Yt, Zt, thorax, heart, media, img_t

    # Iliac wings with iliacus and gluteal muscles in the lowest slices.
    sl = b.box((-200, -100, -1e4), (200, 200, -60))
    if sl is not None:
        Xp, Yp, Zp = b.coords(sl)
        pelvis = (Zp < np.float32(iliac_crest) - np.float32(0.002) * (np.abs(Xp) - 100) ** 2) & (Yp > -25) & (np.abs(Xp) > 42)
        rr = np.sqrt((np.abs(Xp) - 35) ** 2 + (Yp - 45) ** 2)
        wing = pelvis & (np.abs(rr - 72) < 4.5) & (Yp < 80)
        flank = pelvis & ((rr > 76.5) | ((rr > 60) & (rr < 67.5))) & under_fat[sl]
        img_p = img[sl]
        img_p[flank] = hu["muscle"]
        img_p[wing] = np.where(np.abs(rr[wing] - 72) > 2.5, np.float32(hu["cortex"]), np.float32(hu["bone"]))
        allowed[sl] &= ~(wing | flank)
        del Xp, Yp, Zp, pelvis, rr, wing, flank, img_p

    def dome_clip(sl, mask):
        mask &= b.Z[sl] < dome(b.X[sl], b.Y[sl])
        return mask

    # Colon (unlabelled): ascending, transverse, descending and sigmoid, with mottled stool and gas.
    frame_line = colon.point([(-85, -15, -150), (-88, -22, -60), (-85, -35, -15), (-55, -75, -10), (0, -88, -22),
                              (55, -70, -5), (92, -25, 22), (100, 5, -20), (96, 10, -100), (60, -30, -150)])
    pts, rad = _catmull_rom(frame_line, np.array([24, 22, 21, 19, 18, 18, 17, 16, 15, 14], float))
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = dome_clip(sl, (f < 0) & allowed[sl])
        img_c = img[sl]
        img_c[mask] = np.float32(hu["muscle"] - 10) + np.float32(4) * texture[sl][mask]
        lumen = mask & (f < -3.0)
        img_c[lumen] = np.where(texture[sl][lumen] > np.float32(colon_gas), np.float32(hu["gas"]),
                                np.float32(hu["stool"]) + np.float32(40) * texture[sl][lumen])
        del img_c, mask, lumen

    # ---- organs, large first: later ones win overlaps ----
    def clip(sl, mask, below_diaphragm=False):
        mask &= allowed[sl]
        return dome_clip(sl, mask) if below_diaphragm else mask

    # Liver: right lobe and a thinner left lobe reaching across the midline, moulded by wall and diaphragm.
    lobes = [liver.ellipsoid((-62, -8, 78), _rot(0, 18, 0) @ np.diag((80, 86, 76))),
             liver.ellipsoid((5, -50, 95), _rot(0, -10, 10) @ np.diag((70, 34, 38)))]
    bounds = [b.ellipsoid_bounds(*e) for e in lobes]
    sl = b.box(np.min([lo for lo, _ in bounds], 0), np.max([hi for _, hi in bounds], 0))
    if sl is not None:
        mask = (b.ellipsoid_r2(sl, *lobes[0]) < 1) | (b.ellipsoid_r2(sl, *lobes[1]) < 1)
        b.paint(sl, clip(sl, mask, True), _ID["liver"], hu["liver"], texture, 4)

    # Spleen: crescent against the posterolateral wall (outer ellipsoid minus a medial one at the hilum).
    normal = np.array([math.cos(math.radians(40)), math.sin(math.radians(40)), 0.0])
    up = np.array([0.0, -0.45, 1.0])
    up -= (up @ normal) * normal
    up /= np.linalg.norm(up)
    frame = np.column_stack([np.cross(normal, up), normal, up])  # local x: width, y: thickness, z: length
    outer = spleen.ellipsoid((92, 40, 80), frame @ np.diag((38, 22, 58)))
    inner = spleen.ellipsoid(np.array((92, 40, 80)) - 22 * normal, frame @ np.diag((30, 16, 46)))
    sl = b.box(*b.ellipsoid_bounds(*outer))
    if sl is not None:
        mask = (b.ellipsoid_r2(sl, *outer) < 1) & (b.ellipsoid_r2(sl, *inner) >= 1)
        b.paint(sl, clip(sl, mask, True), _ID["spleen"], hu["spleen"], texture, 4)

    # Kidneys: long axis tilted (upper pole medial and posterior), hilum facing anteromedially; right one lower.
    for pose, centre, side, name in ((kidney_r, (-70, 45, -8), 1, "kidney_right"),
                                     (kidney_l, (70, 45, 8), -1, "kidney_left")):
        r0 = _rot(-10, 12 * side, -35 * side)
        kidney = pose.ellipsoid(centre, r0 @ np.diag((26, 20, 55)))
        sinus = pose.ellipsoid(np.asarray(centre) + r0 @ np.array((side * 22.0, 0, 0)), r0 @ np.diag((12, 9, 24)))
        sl = b.box(*b.ellipsoid_bounds(*kidney))
        if sl is None:
            continue
        r2 = b.ellipsoid_r2(sl, *kidney)
        mask = clip(sl, (r2 < 1) & (b.ellipsoid_r2(sl, *sinus) >= 1))
        b.paint(sl, mask, _ID[name], hu["kidney"], texture, 5)
        b.img[sl][mask & (r2 < 0.4)] -= hu["medulla"]

    # Stomach: J-shaped tube from the fundus under the left dome to the pylorus right of the midline.
    centre_line = np.array([(58, 12, 112), (66, -12, 92), (68, -32, 65), (55, -50, 40), (28, -62, 28),
                            (0, -60, 30), (-22, -48, 34)], float)
    radii = np.array([32, 33, 30, 26, 21, 16, 11], float)
    pts, rad = _catmull_rom(stomach.point(centre_line), radii * stomach.radius_scale)
    cardia, pylorus = stomach.point((35, -2, 104)), stomach.point(centre_line[-1])
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = clip(sl, f < 0, True)
        b.paint(sl, mask, _ID["stomach"], hu["stomach"], texture, 5)
        lumen = mask & (f < -stomach_wall)
        gas = lumen & (b.Y[sl] < np.float32(stomach.shift[1] + gas_level))
        img_s = b.img[sl]
        img_s[lumen] = np.float32(hu["fluid"]) + np.float32(6) * texture[sl][lumen]
        img_s[gas] = hu["gas"]

    # Duodenum: C loop from the pylorus around the pancreatic head to the duodenojejunal flexure.
    loop = gut.point([(-40, -35, 38), (-55, -15, 30), (-60, -8, 5), (-57, -8, -20), (-40, -20, -36),
                      (-10, -28, -40), (22, -26, -32), (35, -22, -8), (38, -25, 10)])
    pts, rad = _catmull_rom(np.vstack([pylorus, loop]),
                            np.array([11, 13, 12, 12, 12, 11, 11, 11, 10, 10], float) * gut.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = clip(sl, f < 0)
        b.paint(sl, mask, _ID["duodenum"], hu["duodenum"], texture, 5)
        b.img[sl][mask & (f < -3.0)] = hu["duodenal_fluid"]

    # Pancreas: head inside the duodenal C, neck and body anterior to the aorta, tail towards the splenic hilum.
    pts, rad = _catmull_rom(gut.point([(-36, -18, -5), (-32, -20, 15), (-5, -26, 28), (30, -16, 35),
                                       (60, 0, 42), (84, 14, 50)]),
                            np.array([15, 15, 11, 11, 10, 9], float) * gut.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        b.paint(sl, clip(sl, f < 0), _ID["pancreas"], hu["pancreas"], texture, 9)

    # Esophagus: through the lower mediastinum anterior to the aorta, ending at the cardia.
    pts, rad = _catmull_rom(np.vstack([esophagus.point([(2, -10, 260), (4, -12, 180), (16, -18, 140),
                                                        (24, -14, 118)]), cardia]),
                            np.array([9, 9, 9, 9.5, 10], float) * esophagus.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        mask = clip(sl, f < 0) & (b.lab[sl] != _ID["stomach"])
        b.paint(sl, mask, _ID["esophagus"], hu["esophagus"], texture, 4)

    def spine_y(z):
        return 30 + spine_dy + 0.04 * np.asarray(z, float)

    # Inferior vena cava: right of the spine, through the back of the liver to the heart.
    z = np.array([-120, -60, 0, 50, 100, 150, 200, 260], float)
    cl = np.column_stack([[-20, -22, -24, -26, -24, -18, -8, 0], spine_y(z) - [26, 25, 22, 19, 16, 14, 20, 30], z])
    pts, rad = _catmull_rom(ivc.point(cl), np.array([10, 11, 11, 12, 13, 13, 13, 13]) * ivc.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        b.paint(sl, clip(sl, f < 0), _ID["inferior_vena_cava"], hu["ivc"], texture, 8)

    # Aorta: just anterior and left of the spine from the thorax to the bifurcation (~L4).
    z = np.array([-105, -60, 0, 60, 120, 180, 260], float)
    cl = np.column_stack([[4, 6, 8, 9, 10, 14, 18], spine_y(z) - [30, 30, 30, 30, 28, 26, 26], z])
    pts, rad = _catmull_rom(aorta.point(cl), np.array([10, 11, 12, 12.5, 12.5, 13, 13]) * aorta.radius_scale)
    sl, f = b.tube(pts, rad)
    if sl is not None:
        b.paint(sl, clip(sl, f < 0), _ID["aorta"], hu["aorta"], texture, 6)
    # Common iliac arteries and veins: same contrast, no label.
    bif, conf = aorta.point(cl[0]), ivc.point((-20, spine_y(-120) - 26, -120))
    for start, r, hu_v in ((bif, 6.5, hu["aorta"]), (conf, 7.5, hu["ivc"])):
        for side in (-1, 1):
            sl, f = b.tube([start, start + (side * 45, 10, -80)], [r, r])
            if sl is not None:
                b.img[sl][clip(sl, f < 0) & (b.lab[sl] == 0)] = hu_v

    # Gallbladder: pear-shaped under the liver, fundus pointing anterior-inferior.
    gb = gallbladder.ellipsoid(*liver.ellipsoid((-48, -52, 28), _rot(-40, 10, 0) @ np.diag((14, 14, 38))))
    sl = b.box(*b.ellipsoid_bounds(*gb))
    if sl is not None:
        b.paint(sl, clip(sl, b.ellipsoid_r2(sl, *gb) < 1), _ID["gallbladder"], hu["gallbladder"], texture, 2)

    # Adrenal glands: inverted-Y plates above and medial to the upper poles.
    for host, pose, centre, name in ((kidney_r, adrenal_r, (-42, 30, 60), "adrenal_gland_right"),
                                     (kidney_l, adrenal_l, (36, 30, 45), "adrenal_gland_left")):
        c = np.asarray(centre, float)
        apex, limb_a, limb_b = (pose.point(host.point(c + d)) for d in ((0, -6, 13), (-7, 8, -12), (7, 9, -12)))
        r = 5.5 * pose.radius_scale * host.radius_scale
        for end in (limb_a, limb_b):
            sl, f = b.tube([apex, end], [r, r * 0.85])
            if sl is not None:
                b.paint(sl, clip(sl, f < 0), _ID[name], hu["adrenal"], texture, 3)

    # ---- acquisition: partial volume, bias field, noise ----
    in_plane_w = 0.18
    img = _smooth3(b.img, (0.12, in_plane_w, in_plane_w))
    bias = _smooth_field(np.random.default_rng(field_seeds[4]), axes, 150.0, True)
    img += np.float32(bias_amplitude) * np.tanh(bias)
    img += np.float32(noise_sigma) * np.random.default_rng(field_seeds[5]).standard_normal(img.shape, np.float32)
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)

    image = sitk.GetImageFromArray(img.astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in b.origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    label = sitk.GetImageFromArray(b.lab)
    label.CopyInformation(image)
    return Phantom(image=image, label=label)
