"""Model bundles: a folder with ``model.json`` (everything inference needs to know) and
``weights.safetensors`` (tensors only, so loading a bundle can never run code).

model.json: format version, library version, method, network description, label values, names
and colours, the preprocessing plan, sliding-window patch and stride (z, y, x), the training
data summary (store, case ids and label versions), validation metrics, parent bundle.
A bundle is written once, into a temporary folder renamed into place; it is never overwritten.
"""

from __future__ import annotations

import json
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


def write_bundle(folder: str | os.PathLike, networks: dict, metadata: dict) -> Path:
    """Write ``networks`` (name -> nn.Module) and ``metadata`` as a new bundle folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise BundleError(folder, "already exists; a bundle is never overwritten")
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, network in networks.items() for key, value in network.state_dict().items()}
    metadata = {**metadata, "format": BUNDLE_FORMAT, "networks": sorted(networks)}
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


def load_networks(folder: str | os.PathLike, device="cpu", names=None) -> tuple[dict, dict]:
    """(metadata, name -> network in eval mode) from a bundle; weights are read as tensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .networks import build_network

    folder = Path(folder)
    metadata = read_metadata(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    except (OSError, SafetensorError) as error:
        raise BundleError(folder / WEIGHTS_FILE, f"cannot be read as safetensors weights ({error})") from None
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
