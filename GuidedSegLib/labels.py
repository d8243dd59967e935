"""Label sets: names, values and display colours shared by the store, phantoms and the panel."""

from __future__ import annotations

import colorsys
import hashlib

#: The 13 FLARE22 abdominal organs, in the challenge's label order (value -> name).
FLARE22_LABELS: dict[int, str] = {
    1: "liver",
    2: "kidney_right",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "adrenal_gland_right",
    8: "adrenal_gland_left",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "kidney_left",
}

# Display colours (RGB, 0..1): Slicer's GenericAnatomyColors where they tell organs apart, and
# distinct colours where they do not: the two sides of a paired organ (the kidneys, the adrenal
# glands, the parotids) and organs that lie side by side in one slice (liver, kidney, aorta, spleen;
# brainstem, parotid; spinal cord, mandible).
_KNOWN_COLOURS: dict[str, tuple[float, float, float]] = {
    "liver": (0.867, 0.510, 0.396),
    "kidney_right": (0.600, 0.250, 0.180),
    "kidney_left": (0.976, 0.855, 0.180),
    "kidney": (0.600, 0.250, 0.180),
    "spleen": (0.435, 0.259, 0.757),
    "pancreas": (0.976, 0.706, 0.435),
    "aorta": (0.863, 0.078, 0.176),
    "inferior_vena_cava": (0.000, 0.592, 0.808),
    "adrenal_gland_right": (0.863, 0.961, 0.078),
    "adrenal_gland_left": (0.180, 0.800, 0.443),
    "gallbladder": (0.545, 0.588, 0.384),
    "esophagus": (0.827, 0.671, 0.561),
    "stomach": (0.945, 0.600, 0.757),
    "duodenum": (1.000, 0.992, 0.898),
    "left_atrium": (0.808, 0.369, 0.310),
    "brainstem": (0.467, 0.627, 0.784),
    "spinalcord": (0.945, 0.835, 0.275),
    "spinal_cord": (0.945, 0.835, 0.275),
    "rightparotid": (0.753, 0.408, 0.345),
    "leftparotid": (0.302, 0.686, 0.290),
    "larynx": (0.706, 0.612, 0.773),
    "mandible": (0.898, 0.890, 0.800),
}


def normalise_name(name: str) -> str:
    """Canonical form used to match label names: lower case, spaces and dashes as underscores."""
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


def label_colour(name: str) -> tuple[float, float, float]:
    """A stable display colour for a label name (known anatomy colour, else derived from the name)."""
    key = normalise_name(name)
    if key in _KNOWN_COLOURS:
        return _KNOWN_COLOURS[key]
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    hue = digest[0] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.55 + 0.3 * digest[1] / 255.0, 0.75 + 0.25 * digest[2] / 255.0)
    return (round(r, 3), round(g, 3), round(b, 3))


def is_lateral(name: str) -> bool:
    """True for a name that says which side of the body the structure is on ("kidney_left",
    "RightParotid", "Parotid_L"): mirroring an image left to right swaps such organs' meaning."""
    key = normalise_name(name)
    words = key.split("_")
    return "left" in key or "right" in key or words[0] in ("l", "r") or words[-1] in ("l", "r")


def _swap_side(key: str) -> str:
    """The canonical name of the same structure on the other side ("kidney_left" -> "kidney_right",
    "rightparotid" -> "leftparotid", "parotid_l" -> "parotid_r")."""
    swapped = key.replace("left", "\0").replace("right", "left").replace("\0", "right")
    if swapped != key:
        return swapped
    words = key.split("_")
    flip = {"l": "r", "r": "l"}
    if words[0] in flip:
        words[0] = flip[words[0]]
    elif words[-1] in flip:
        words[-1] = flip[words[-1]]
    return "_".join(words)


def mirror_permutation(names: list[str]) -> tuple[list[int] | None, list[str]]:
    """Class permutation for a left-right mirror: index i -> the index of i's other-side twin.

    ``names`` are the class names by class index. Returns ``(permutation, unpaired)``: unsided
    classes map to themselves, each sided class to its twin; ``permutation`` is None when a sided
    class has no twin among ``names`` (``unpaired`` lists those), since a mirrored crop would then
    show that organ on a side it never has.
    """
    keys = [normalise_name(n) for n in names]
    index = {k: i for i, k in enumerate(keys)}
    permutation, unpaired = [], []
    for i, key in enumerate(keys):
        if not is_lateral(key):
            permutation.append(i)
            continue
        twin = index.get(_swap_side(key))
        if twin is None or twin == i:
            unpaired.append(names[i])
            permutation.append(i)
        else:
            permutation.append(twin)
    return (None if unpaired else permutation), unpaired
