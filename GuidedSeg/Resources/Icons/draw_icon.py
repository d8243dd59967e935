"""Draw the GuidedSeg icon (128x128 RGBA PNG) with numpy + zlib + struct only.

Design: a rounded dark-blue tile; a grey CT-like axial slice (circular field of
view, body outline, spine); a liver-like organ in warm red-brown with a crisp
light outline (the segmentation); a bright yellow guide arrow ending in a seed
dot on the organ ("guided by a few labels").

Everything is drawn as coverage masks on a 4x supersampled grid and box-filtered
down (premultiplied alpha), so edges are anti-aliased. Output is deterministic.

    python GuidedSeg/Resources/Icons/draw_icon.py

writes GuidedSeg/Resources/Icons/GuidedSeg.png and the identical top-level
GuidedSeg.png (the extension icon).
"""

import os
import struct
import zlib

import numpy as np

SIZE = 128
SS = 4  # supersampling factor
N = SIZE * SS

# Pixel-centre coordinates in icon units (0..128), y pointing down.
_c = (np.arange(N, dtype=np.float64) + 0.5) / SS
Y, X = np.meshgrid(_c, _c, indexing="ij")


def rgb(hex_colour):
    h = hex_colour.lstrip("#")
    return np.array([int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)])


# --- shapes (boolean masks on the supersampled grid) -----------------------

def rounded_rect(x0, y0, x1, y1, r):
    cx = np.clip(X, x0 + r, x1 - r)
    cy = np.clip(Y, y0 + r, y1 - r)
    return (X - cx) ** 2 + (Y - cy) ** 2 <= r * r


def ellipse(cx, cy, rx, ry):
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def segment_dist(x0, y0, x1, y1):
    """Distance from every pixel to the segment (x0,y0)-(x1,y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))


def triangle(p0, p1, p2):
    def side(a, b):
        return (b[0] - a[0]) * (Y - a[1]) - (b[1] - a[1]) * (X - a[0])
    s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def blob(centres, threshold):
    """Metaball field sum(w * exp(-d^2 / s^2)) >= threshold: a smooth organic shape."""
    field = np.zeros_like(X)
    for cx, cy, s, w in centres:
        field += w * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (s * s))
    return field >= threshold


def erode(mask, radius):
    """Binary erosion by a disk of `radius` icon units (min over disk offsets)."""
    r = int(round(radius * SS))
    out = mask.copy()
    padded = np.pad(mask, r, constant_values=False)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out &= padded[r + dy:r + dy + N, r + dx:r + dx + N]
    return out


def dilate(mask, radius):
    """Binary dilation by a disk (erosion of the complement)."""
    return ~erode(~mask, radius)


# --- compositing ------------------------------------------------------------

class Canvas:
    def __init__(self):
        self.rgb = np.zeros((N, N, 3))  # premultiplied
        self.a = np.zeros((N, N))

    def paint(self, mask, colour, alpha=1.0):
        """Source-over `colour` (RGB array or HxWx3 array) where mask is True."""
        m = mask.astype(np.float64) * alpha
        col = np.broadcast_to(colour, (N, N, 3))
        self.rgb = col * m[..., None] + self.rgb * (1.0 - m[..., None])
        self.a = m + self.a * (1.0 - m)

    def downsample(self):
        def box(arr):
            return arr.reshape(SIZE, SS, SIZE, SS, *arr.shape[2:]).mean(axis=(1, 3))
        prgb, a = box(self.rgb), box(self.a)
        col = np.where(a[..., None] > 0, prgb / np.maximum(a[..., None], 1e-12), 0.0)
        rgba = np.concatenate([col, a[..., None]], axis=2)
        return np.clip(np.round(rgba * 255.0), 0, 255).astype(np.uint8)


def draw():
    cv = Canvas()

    # Tile: rounded square, vertical dark-blue gradient, thin lighter border.
    tile = rounded_rect(2, 2, 126, 126, 22)
    t = ((Y - 2) / 124.0)[..., None]
    gradient = rgb("#23427a") * (1 - t) + rgb("#0f1e3d") * t
    cv.paint(tile, rgb("#3a5f9e"))
    cv.paint(rounded_rect(3.5, 3.5, 124.5, 124.5, 20.5), gradient)

    # CT slice: circular field of view (dark), body outline, soft tissue, spine.
    cx, cy = 64.0, 66.0
    # two slices peeking out behind, up-right: a stack of slices = a 3D volume
    for k, rim in ((2, "#4f6690"), (1, "#7688aa")):
        ox, oy = 4.5 * k, -4.5 * k
        cv.paint(ellipse(cx + ox, cy + oy, 52, 52), rgb(rim))
        cv.paint(ellipse(cx + ox, cy + oy, 50.5, 50.5), rgb("#25324d"))
    cv.paint(ellipse(cx, cy, 52, 52), rgb("#a3adbf"))          # FOV rim
    cv.paint(ellipse(cx, cy, 50.5, 50.5), rgb("#23272f"))      # air inside FOV
    body = ellipse(cx, cy + 2, 45, 35) & (Y <= cy + 33)         # flattened back
    cv.paint(body, rgb("#d9dde3"))                             # skin outline
    cv.paint(erode(body, 2.0), rgb("#8f949c"))                 # subcutaneous fat
    cv.paint(erode(body, 6.0), rgb("#6b7079"))                 # soft tissue
    cv.paint(ellipse(cx, cy + 24, 7.5, 6.5), rgb("#f2f2ee"))   # vertebral body
    cv.paint(ellipse(cx, cy + 24, 3.5, 3.0), rgb("#b5b5ae"))
    cv.paint(ellipse(cx + 27, cy + 13, 6, 8), rgb("#858a93"))  # left kidney (image right)
    cv.paint(ellipse(cx + 9, cy + 14, 3.2, 3.2), rgb("#c9ccd2"))  # aorta

    # Organ (liver-like, on the image left), segmented: fill + crisp outline.
    liver = blob(
        [
            (30, 68, 16, 1.0),
            (38, 56, 14, 0.9),
            (34, 82, 12, 0.8),
            (52, 50, 11, 0.75),
            (66, 48, 8, 0.55),
            (76, 49, 5, 0.35),
            (47, 70, 9, 0.45),
        ],
        0.45,
    ) & erode(body, 5.0)
    cv.paint(liver, rgb("#f3b38e"))                            # outline colour
    inner = erode(liver, 2.0)
    shade = ((Y - 40) / 50.0).clip(0, 1)[..., None]
    cv.paint(inner, rgb("#c0634a") * (1 - shade) + rgb("#94432f") * shade)

    # Guide: arrow from the top-right corner to a seed dot on the organ.
    sx, sy = 38.0, 68.0          # seed on the organ
    tx, ty = 108.0, 20.0         # arrow tail
    ux, uy = sx - tx, sy - ty
    length = np.hypot(ux, uy)
    ux, uy = ux / length, uy / length
    px, py = -uy, ux             # perpendicular
    tip_x, tip_y = sx - ux * 7.5, sy - uy * 7.5    # arrowhead tip, short of the dot
    base_x, base_y = tip_x - ux * 13.0, tip_y - uy * 13.0
    head = triangle(
        (tip_x, tip_y),
        (base_x + px * 7.5, base_y + py * 7.5),
        (base_x - px * 7.5, base_y - py * 7.5),
    )
    shaft_end_x, shaft_end_y = base_x + ux * 2.0, base_y + uy * 2.0
    shaft = segment_dist(tx, ty, shaft_end_x, shaft_end_y)
    dark = rgb("#101a2e")
    yellow = rgb("#ffd83a")
    # dark halo first so the arrow stays legible over every background
    cv.paint((shaft <= 4.6) | dilate(head, 2.0), dark)
    cv.paint(shaft <= 2.6, yellow)
    cv.paint(head, yellow)
    # seed dot: dark ring, yellow dot, white centre
    d = np.hypot(X - sx, Y - sy)
    cv.paint(d <= 6.6, dark)
    cv.paint(d <= 5.0, yellow)
    cv.paint(d <= 2.0, rgb("#ffffff"))

    return cv.downsample()


# --- PNG writer -------------------------------------------------------------

def png_bytes(rgba):
    h, w, _ = rgba.shape

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(h))  # filter: none
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo_root = os.path.normpath(os.path.join(here, "..", "..", ".."))
    data = png_bytes(draw())
    for path in (os.path.join(here, "GuidedSeg.png"), os.path.join(repo_root, "GuidedSeg.png")):
        with open(path, "wb") as f:
            f.write(data)
        print("wrote", os.path.relpath(path, repo_root))


if __name__ == "__main__":
    main()
