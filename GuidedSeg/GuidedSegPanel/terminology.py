"""Standard codes (SNOMED CT) for segment names, in Slicer's terminology-entry format.

Slicer reads a segment's "TerminologyEntry" tag as
``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``,
each code ``scheme^value^meaning``. Names are matched after :func:`normalise_name`, so "Kidney
left", "kidney-left" and "kidney_left" are the same organ. Names without a code get none.
"""

from __future__ import annotations

from GuidedSegLib.labels import normalise_name

_CONTEXT = "Segmentation category and type - DICOM master list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
_STRUCTURE = "SCT^123037004^Anatomical Structure"
_RIGHT = "SCT^24028007^Right"
_LEFT = "SCT^7771000^Left"

# normalised name -> (SNOMED CT code, meaning, laterality modifier or "")
_CODES: dict[str, tuple[str, str, str]] = {
    "liver": ("10200004", "Liver", ""),
    "spleen": ("78961009", "Spleen", ""),
    "pancreas": ("15776009", "Pancreas", ""),
    "kidney": ("64033007", "Kidney", ""),
    "kidney_right": ("64033007", "Kidney", _RIGHT),
    "right_kidney": ("64033007", "Kidney", _RIGHT),
    "kidney_left": ("64033007", "Kidney", _LEFT),
    "left_kidney": ("64033007", "Kidney", _LEFT),
    "aorta": ("15825003", "Aorta", ""),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", ""),
    "ivc": ("64131007", "Inferior vena cava", ""),
    "adrenal_gland_right": ("23451007", "Adrenal gland", _RIGHT),
    "right_adrenal_gland": ("23451007", "Adrenal gland", _RIGHT),
    "adrenal_gland_left": ("23451007", "Adrenal gland", _LEFT),
    "left_adrenal_gland": ("23451007", "Adrenal gland", _LEFT),
    "gallbladder": ("28231008", "Gallbladder", ""),
    "esophagus": ("32849002", "Esophagus", ""),
    "oesophagus": ("32849002", "Esophagus", ""),
    "stomach": ("69695003", "Stomach", ""),
    "duodenum": ("38848004", "Duodenum", ""),
    "left_atrium": ("82471001", "Left atrium", ""),
    "heart_atrium_left": ("82471001", "Left atrium", ""),
    "brainstem": ("119238007", "Brain stem", ""),  # the code Slicer's DICOM master list has
    "spinal_cord": ("2748008", "Spinal cord", ""),
    "spinalcord": ("2748008", "Spinal cord", ""),
    "parotid_right": ("45289007", "Parotid gland", _RIGHT),
    "rightparotid": ("45289007", "Parotid gland", _RIGHT),
    "right_parotid": ("45289007", "Parotid gland", _RIGHT),
    "parotid_left": ("45289007", "Parotid gland", _LEFT),
    "leftparotid": ("45289007", "Parotid gland", _LEFT),
    "left_parotid": ("45289007", "Parotid gland", _LEFT),
    "larynx": ("4596009", "Larynx", ""),
    "mandible": ("91609006", "Mandible", ""),
}


def terminology_entry(name: str) -> str | None:
    """Slicer's terminology-entry string for an organ name, or None when no code is known."""
    code = _CODES.get(normalise_name(name))
    if code is None:
        return None
    value, meaning, modifier = code
    modifier = modifier or "^^"
    return f"{_CONTEXT}~{_STRUCTURE}~SCT^{value}^{meaning}~{modifier}~{_ANATOMIC_CONTEXT}~^^~^^"
