"""Model bundles: a folder with ``model.json`` (everything inference needs to know) and
``weights.safetensors`` (tensors only, so loading a bundle can never run code).

model.json: format version, library version, method, network description, label values, names
and colours, the preprocessing plan, sliding-window patch and stride (z, y, x), the training
data summary (store, case ids and label versions), validation metrics, parent bundle.
A bundle is written once, into a temporary folder renamed into place; it is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

from .errors import GuidedSegError

BUNDLE_FORMAT = 1
METADATA_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


class BundleError(GuidedSegError, ValueError):
    """A bundle that cannot be used; the message names the folder and the problem."""

    def __init__(self, bundle, problem: str):
        super().__init__(f"{os.fspath(bundle)}: {problem}")


def write_bundle(folder: str | os.PathLike, networks: dict, metadata: dict, extra: dict | None = None) -> Path:
    """Write ``networks`` (name -> nn.Module) and ``metadata`` as a new bundle folder.

    ``extra``: more tensors a method keeps beside its networks (name -> tensor, e.g. GuidedNet's
    mixture statistics, ``cgmm.A.mean``); their names go into model.json's ``extra_tensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise BundleError(folder, "already exists; a bundle is never overwritten")
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, network in networks.items() for key, value in network.state_dict().items()}
    clash = sorted(set(extra or {}) & set(tensors))
    if clash:
        raise BundleError(folder, f"extra tensors {', '.join(clash)} would overwrite network weights")
    tensors.update({key: value.detach().cpu().contiguous() for key, value in (extra or {}).items()})
    metadata = {**metadata, "format": BUNDLE_FORMAT, "networks": sorted(networks), "extra_tensors": sorted(extra or {})}
    tmp = folder.with_name(f".tmp-{secrets.token_hex(4)}-{folder.name}")
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"guidedseg_format": str(BUNDLE_FORMAT)})
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_metadata(folder: str | os.PathLike) -> dict:
    """``model.json`` of a bundle, checked for a format this library reads."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.exists():
        raise BundleError(folder, "no such bundle folder")
    if not path.is_file():
        raise BundleError(folder, f"is not a GuidedSeg model bundle: no {METADATA_FILE}")
    try:
        metadata = json.loads(path.read_text())
    except ValueError as error:
        raise BundleError(path, f"is not valid JSON ({error})") from None
    version = metadata.get("format")
    if not isinstance(version, int):
        raise BundleError(path, "has no bundle format version")
    if version > BUNDLE_FORMAT:
        raise BundleError(folder, f"has bundle format {version}, newer than this GuidedSeg reads "
                                  f"({BUNDLE_FORMAT}); update GuidedSeg")
    return metadata


def check_metadata(folder: str | os.PathLike, metadata: dict) -> None:
    """Refuse a model.json whose parts do not fit together (labels vs the network's head,
    patch vs stride, a preprocessing plan this library cannot read)."""
    from .preprocessing import PreprocessingPlan

    for key in ("network", "labels", "preprocessing", "patch", "stride", "networks"):
        if key not in metadata:
            raise BundleError(folder, f"model.json has no {key!r}")
    labels = metadata["labels"]
    if not isinstance(labels, dict) or "0" not in labels or not all(str(v).isdigit() for v in labels):
        raise BundleError(folder, "model.json 'labels' must map label values (with 0, background) to names")
    head = metadata["network"].get("out_channels")
    if head != len(labels):
        raise BundleError(folder, f"its labels do not match its network: {len(labels)} labels "
                                  f"({', '.join(labels.values())}) but the network's head has {head} outputs")
    patch, stride = metadata["patch"], metadata["stride"]
    if len(patch) != 3 or len(stride) != 3 or min(patch) < 1 or min(stride) < 1:
        raise BundleError(folder, f"patch {patch} and stride {stride} must be three positive sizes (z, y, x)")
    try:
        PreprocessingPlan.from_dict(metadata["preprocessing"])
    except (TypeError, ValueError) as error:
        raise BundleError(folder, f"its preprocessing cannot be used: {error}") from None


def load_networks(folder: str | os.PathLike, device="cpu", names=None) -> tuple[dict, dict]:
    """(metadata, name -> network in eval mode) from a bundle; weights are read as tensors only.

    safetensors holds nothing but tensors, so a weights file that is anything else (a pickle
    that could run code on loading) fails to parse and is refused. Tensors are placed straight
    on ``device``: a bundle made on a GPU loads on a CPU and the reverse.
    """
    from safetensors.torch import load_file

    from .networks import build_network

    folder = Path(folder)
    metadata = read_metadata(folder)
    check_metadata(folder, metadata)
    unknown = sorted(set(names or []) - set(metadata["networks"]))
    if unknown:
        raise BundleError(folder, f"has no network {', '.join(unknown)} (it holds {', '.join(metadata['networks'])})")
    path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises several types for a file that is not its format
        raise BundleError(path, f"cannot be read as safetensors weights (tensors only): {_first_line(error)}") from None
    networks = {}
    for name in names or metadata["networks"]:
        network = build_network(metadata["network"])
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise BundleError(folder, f"weights of network {name} do not fit its description "
                                      f"({str(error).splitlines()[0]})") from None
        networks[name] = network.to(device).eval()
    return metadata, networks


def load_extra_tensors(folder: str | os.PathLike, prefix: str = "", device="cpu") -> dict:
    """The bundle's extra tensors (see :func:`write_bundle`) whose names start with ``prefix``,
    without loading the network weights; an empty dict for a bundle that has none."""
    from safetensors import safe_open

    folder = Path(folder)
    names = [n for n in read_metadata(folder).get("extra_tensors", []) if n.startswith(prefix)]
    if not names:
        return {}
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as weights:
            return {name: weights.get_tensor(name) for name in names}
    except Exception as error:  # safetensors raises several types for a file that is not its format
        raise BundleError(path, f"cannot read extra tensors {', '.join(names)}: {_first_line(error)}") from None


def weights_summary(folder: str | os.PathLike) -> dict:
    """Tensor count, parameter count, dtypes and size of a bundle's network weights (not its
    ``extra_tensors``), read from the safetensors header alone (no tensor is loaded)."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_FILE
    extra = set(read_metadata(folder).get("extra_tensors", []))
    try:
        with safe_open(str(path), framework="numpy") as weights:
            slices = [weights.get_slice(key) for key in weights.keys() if key not in extra]
            shapes, dtypes = [s.get_shape() for s in slices], {s.get_dtype() for s in slices}
    except Exception as error:  # safetensors raises several types for a file that is not its format
        raise BundleError(path, f"cannot be read as safetensors weights (tensors only): {_first_line(error)}") from None
    return {"file": str(path), "bytes": path.stat().st_size, "tensors": len(shapes),
            "parameters": sum(math.prod(shape) for shape in shapes), "dtypes": sorted(dtypes)}


def describe_bundle(folder: str | os.PathLike) -> str:
    """A readable account of a bundle: what it segments, how it was trained, how well it did."""
    metadata = read_metadata(folder)
    check_metadata(folder, metadata)
    weights = weights_summary(folder)
    plan = metadata["preprocessing"]
    training = metadata.get("training") or {}
    network = metadata["network"]
    lines = [
        f"bundle     {Path(folder)}",
        f"name       {metadata.get('name', '-')}  (format {metadata['format']}, GuidedSeg "
        f"{metadata.get('library_version', '?')}, created {metadata.get('created', '?')})",
        f"method     {metadata.get('method', '?')}; networks {', '.join(metadata['networks'])}; "
        f"{network.get('architecture', '?')} widths {network.get('widths')}"
        f"{'; deep supervision ' + str(network['deep_supervision']) if network.get('deep_supervision') else ''}; "
        f"{weights['parameters']:,} parameters "
        f"in {weights['tensors']} tensors ({weights['bytes'] / 2**20:.1f} MB, {', '.join(weights['dtypes'])})",
        f"input      {plan.get('modality')}; orientation {plan.get('orientation')}; spacing "
        f"{plan.get('target_spacing')} mm (x, y, z); clip {plan.get('clip')}; {plan.get('normalisation')} "
        f"normalisation ({plan.get('source')})",
        f"windows    patch {metadata['patch']} stride {metadata['stride']} (z, y, x)",
    ]
    if training:
        lines.append(f"training   {len(training.get('labeled', {}))} labeled + {training.get('unlabeled', 0)} unlabeled "
                     f"cases of store {training.get('store_name', '?')}; {training.get('iterations', '?')} iterations "
                     f"(best {training.get('best_iteration', '?')}); {training.get('seconds_per_iteration', '?')} s/it, "
                     f"peak memory {training.get('peak_memory_mb', '?')} MB")
        if training.get("selection"):
            lines.append(f"weights    {training['selection']}")
    if metadata.get("parent"):
        lines.append(f"parent     {metadata['parent']}")
    validation = metadata.get("validation") or {}
    per_organ = validation.get("per_organ", {})
    lines.append(f"labels     {'value':>5}  {'name':<24} {'colour':<17} validation Dice (n)")
    for value, name in metadata["labels"].items():
        colour = metadata.get("colours", {}).get(value)
        score = per_organ.get(value)
        shown = f"{score['dice']:.3f} ± {score['sd']:.3f} ({score['n']})" if score else "-"
        colour_text = ",".join(f"{c:.2f}" for c in colour) if colour else "-"
        lines.append(f"           {value:>5}  {name:<24} {colour_text:<17} {shown}")
    if training.get("not_trained"):
        lines.append(f"not learned {', '.join(training['not_trained'].values())} (annotated in no training case)")
    if validation:
        lines.append(f"validation mean Dice {validation.get('mean_dice', float('nan')):.4f} over "
                     f"{validation.get('cases', '?')} cases")
    return "\n".join(lines)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else error.__class__.__name__
