"""The training configuration: one dataclass tree, read from YAML and ``key=value`` overrides.

Every key is checked before anything runs: a typo gets an error that names it and suggests the
closest known key, a wrong type gets an error naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from GuidedSegLib.errors import GuidedSegError
from GuidedSegLib.methods import METHODS, MethodOptions, method_class


class ConfigError(GuidedSegError, ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class UXNetConfig:
    """Sizes of network.type uxnet-kmax (methods.md 2.1). The defaults are the paper's structure at a
    CPU size: widths / 6, 24 queries of dimension 32 (2.7 s per dkuxnet step of 2 + 2 crops of
    48 x 48 x 32 at one thread, Testing/BENCHMARKS.md, issue 21); the paper's sizes are in
    Training/configs/dkuxnet.yaml."""

    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    queries: int = 24
    query_dim: int = 32
    layers_per_scale: int = 2  # k-means cross-attention layers at each of 1/8, 1/4, 1/2
    heads: int = 4
    layer_scale: float = 1e-6
    # 1x1x1 heads on the CNN decoder maps at 1/2 (, 1/4, 1/8) in L_seg. 2: DK-UXNet on la-mri 10 %
    # scored 83.6 +- 0.8 test Dice over 3 seeds against 82.7 +- 0.9 with 0, higher on every seed
    # (Testing/BENCHMARKS.md, issue 21). The paper's network has none (configs/dkuxnet.yaml).
    deep_supervision: int = 2


@dataclass
class NetworkConfig:
    # "auto": the method's own network (Method.default_network), else a name in
    # NETWORK_SETTINGS (GuidedSegLib.networks.ARCHITECTURES); each reads its settings below.
    type: str = "auto"
    # unet3d:
    # Channels per level. The full-resolution block feeds the 1x1x1 head, so it needs room for the
    # classes: [4, ...] left 11 of 13 phantom organs unlearned after 1000 steps, [8, ...] learned 7 by
    # step 600 (Testing/BENCHMARKS.md). Paper: [16, 32, 64, 128, 256].
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    dropout: float = 0.0  # the paper's 0.3 is in Training/configs/guidednet-paper.yaml; 0 learned faster here
    feature_layer: int = 4  # decoder block whose features the CGMM models (4 = last, full resolution)
    # Coarser decoder blocks with their own head in L_sup (nnU-Net's deep supervision). "auto": the
    # two below full resolution, as many as the widths allow (la-mri, supervised: 83.5 +- 1.1 test Dice
    # over 3 seeds against 82.2 +- 3.2 without, and no late over-segmentation; Testing/BENCHMARKS.md).
    deep_supervision: typing.Any = "auto"
    uxnet: UXNetConfig = field(default_factory=UXNetConfig)  # uxnet-kmax


@dataclass
class DataConfig:
    preprocessing: str = "planned"  # "planned" from the training data, or a preset name
    patch: typing.Any = "auto"  # "auto" or [z, y, x]
    patch_voxels: int = 48 * 48 * 32  # budget of an automatic patch
    labeled_batch: int = 2  # global, over all processes
    unlabeled_batch: int = 2
    foreground: float = 0.5  # share of labeled crops centred on an annotated organ
    partial_labels: bool = True  # unannotated organs are unknown (False: plain, read as background)
    mirror: str = "left-right"  # "left-right" (paired organs swapped), "all" (also flip z and y), "none"
    augment: bool = True  # small rotations and zooms, intensity scale / shift / gamma / noise
    cache: str | None = None  # preprocessed-data cache (default: <output>/cache)
    workers: int = 0  # DataLoader processes


@dataclass
class OptimConfig:
    iterations: int = 200
    # AdamW 0.01 learned phantoms and OpenKBP within CPU budgets where SGD 0.05 (the paper's
    # optimiser at its GPU budget, in guidednet-paper.yaml) did not (Testing/BENCHMARKS.md).
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum, as the paper)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip: float = 12.0  # max gradient norm (0: off)
    amp: str = "auto"  # "auto" (on for CUDA), "on" (also CPU: bf16 where it has AMX/AVX512-BF16), "off"


# Each architecture's constructor arguments from the network section.
NETWORK_SETTINGS = {
    "unet3d": lambda n: {"widths": list(n.widths), "dropout": n.dropout, "feature_layer": n.feature_layer,
                         "deep_supervision": min(2, len(n.widths) - 2) if n.deep_supervision == "auto"
                         else n.deep_supervision},
    "uxnet-kmax": lambda n: dataclasses.asdict(n.uxnet),
}

SMALL_STORE = 10  # labeled cases below which "auto" keeps every case in training


@dataclass
class ValidationConfig:
    # Share of labeled cases held out to choose the weights. "auto": none below 10 labeled cases
    # (with 3, a held-out case is a third of the training data; the final weights are kept), the
    # store's own fraction (default 0.2, decided per case id) from 10 on.
    fraction: typing.Any = "auto"
    # Folder of reference label maps (<case id>.nii.gz, relative to the store) for some unlabeled
    # cases: scored at every validation for the curve only (log, TensorBoard), never to choose weights.
    monitor: str | None = None
    monitor_cases: int = 4
    every: int = 50  # iterations between validations (and at the end)
    overlap: float = 0.5  # sliding-window overlap
    ensemble: bool = False  # average networks A and B (two-network methods)


@dataclass
class InferenceConfig:
    patch: list[int] | None = None  # sliding-window size written to the bundle (default: training patch)
    stride: list[int] | None = None  # default: half the patch


@dataclass
class PhantomConfig:
    """The store generated when no ``store`` is given (the README's default job)."""

    cases: int = 24
    labeled: int = 4
    test: int = 4
    seed: int = 0
    # Coarse voxels (x, y, z) keep the default job to minutes on a CPU: one crop holds the abdomen.
    size: list[int] = field(default_factory=lambda: [48, 48, 32])
    spacing: list[float] = field(default_factory=lambda: [8.0, 8.0, 10.0])


@dataclass
class TrainConfig:
    store: str | None = None  # case store folder; None: synthetic phantoms in <output>/phantom-store
    output: str = "runs/guidednet-phantoms"
    method: str = "guidednet"  # a name in GuidedSegLib.methods.METHODS
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # warm start: a model bundle whose weights start every network (train.py --init-from; its
    # preprocessing and labels are kept, and the new bundle names it as its parent)
    init_from: str | None = None
    checkpoint_every: int = 50
    log_every: int = 10
    # Each loss term's share of the gradient norm, to gradients.csv and TensorBoard, every this
    # many iterations (one extra backward pass per term; 0: never).
    gradients_every: int = 100
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: MethodOptions = field(default_factory=MethodOptions)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)

    def to_dict(self) -> dict:
        """The settings as run: ``objective`` holds what the method really uses (a cps run says
        kt_cps: false and cgmm: false, whatever the defaults), ``network.type`` the architecture."""
        data = dataclasses.asdict(self)
        if self.method in METHODS:
            data["objective"] = dataclasses.asdict(self.method_options())
            data["network"]["type"] = self.network_type()
        return data

    @property
    def uses_unlabeled(self) -> bool:
        """Whether the method learns from unlabeled crops (the supervised baseline does not)."""
        return method_class(self.method).uses_unlabeled

    def network_type(self) -> str:
        """The architecture to build: ``network.type``, or the method's own for "auto"."""
        return method_class(self.method).default_network if self.network.type == "auto" else self.network.type

    def network_spec(self) -> dict:
        """The description the method builds its networks from (the bundle stores the same form)."""
        architecture = self.network_type()
        return {"architecture": architecture, "in_channels": 1, **NETWORK_SETTINGS[architecture](self.network)}

    def method_options(self) -> MethodOptions:
        """The objective switches for the chosen method (``cps`` turns KT-CPS and the CGMM off)."""
        return MethodOptions.preset(self.method, **dataclasses.asdict(self.objective))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                base: dict | None = None) -> TrainConfig:
    """Defaults (or the settings in ``base``), then the YAML file, then ``section.key=value``
    overrides (values parsed as YAML)."""
    data: dict = _merge({}, base or {})
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must hold a mapping of settings, not {type(loaded).__name__}")
        data = _merge(data, loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.iterations=500)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = yaml.safe_load(value) if value else None
    config = _build(TrainConfig, data, "")
    check(config)
    return config


def resume_config(output: str | Path, path: str | Path | None = None,
                  overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """The settings of the run saved in ``output`` (its ``config.yaml``), with any given on the
    command line on top: ``--resume --output RUN`` alone continues the run exactly as it was
    started. The trainer then refuses a setting that differs from the saved one, naming it."""
    output = Path(output)
    saved_file = output / "config.yaml"
    if not saved_file.is_file():
        what = "no such folder" if not output.exists() else "no config.yaml"
        raise ConfigError(f"{output}: nothing to resume ({what}); start without --resume")
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{saved_file}: cannot be read ({str(error).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_file}: must hold a mapping of settings")
    saved["output"] = str(output)  # where the run is now, even if it was moved
    _settings_of_older_runs(saved)
    try:
        return load_config(path, overrides, base=saved)
    except ConfigError as error:
        raise ConfigError(f"resuming {output}: {error}") from None


FINETUNE = Path(__file__).resolve().parent / "configs" / "finetune.yaml"


def _settings_of_older_runs(saved: dict) -> None:
    """Fill in, as they were then, the settings a run or bundle made before they existed lacks:
    without ``network.deep_supervision`` or ``network.uxnet.deep_supervision`` its networks have
    no coarse heads."""
    network = saved.setdefault("network", {})
    if isinstance(network, dict):
        network.setdefault("deep_supervision", 0)
        if isinstance(network.get("uxnet"), dict):
            network["uxnet"].setdefault("deep_supervision", 0)


def finetune_config(bundle: str | Path, path: str | Path | None = None,
                    overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """The settings of a warm start from ``bundle``: the parent's own training settings (its
    network, patch, method and store), then ``configs/finetune.yaml`` (the short schedule), then
    ``path`` and ``overrides``. The output defaults to a new ``<parent run>-ft<N>`` folder beside
    the parent's run, and the preprocessing cache to the parent's (keyed by plan, so reusable)."""
    from GuidedSegLib.bundle import read_metadata
    from GuidedSegLib.lineage import next_version_folder

    bundle = Path(bundle).resolve()
    metadata = read_metadata(bundle)  # a newer bundle format is refused here, before anything else
    training = metadata.get("training") or {}
    base = dict(training.get("config") or {})
    base.pop("phantoms", None)
    _settings_of_older_runs(base)
    if metadata.get("method") in METHODS:
        base["method"] = metadata["method"]
    base["store"] = training.get("store") or base.get("store")
    base["init_from"] = str(bundle)
    base["output"] = str(next_version_folder(bundle))
    run = bundle.parent
    data = dict(base.get("data") or {})
    if not data.get("cache") and (run / "cache").is_dir():
        data["cache"] = str(run / "cache")
    base["data"] = data
    try:
        base = _merge(base, yaml.safe_load(FINETUNE.read_text()) or {})
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{FINETUNE}: cannot be read ({str(error).splitlines()[0]})") from None
    try:
        return load_config(path, overrides, base=base)
    except ConfigError as error:
        raise ConfigError(f"fine-tuning {bundle}: {error}") from None


def _merge(base: dict, extra: dict) -> dict:
    """A copy of ``base`` with ``extra`` merged in, section by section."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check(config: TrainConfig) -> None:
    """Value checks that do not need the data."""
    if config.method not in METHODS:
        raise ConfigError(f"method {config.method!r} is not one of {list(METHODS)}")
    if config.network.type != "auto" and config.network.type not in NETWORK_SETTINGS:
        raise ConfigError(f"network.type {config.network.type!r} is not 'auto' or one of {sorted(NETWORK_SETTINGS)}")
    d, o = config.data, config.optim
    if d.patch != "auto" and not (isinstance(d.patch, list) and len(d.patch) == 3 and all(isinstance(p, int) and p > 0 for p in d.patch)):
        raise ConfigError(f"data.patch {d.patch!r} must be 'auto' or three positive integers [z, y, x]")
    if d.labeled_batch < 1:
        raise ConfigError(f"data.labeled_batch {d.labeled_batch} must be at least 1")
    if d.unlabeled_batch < 0:
        raise ConfigError(f"data.unlabeled_batch {d.unlabeled_batch} must not be negative")
    v = config.validation
    if v.fraction != "auto" and not (isinstance(v.fraction, (int, float)) and not isinstance(v.fraction, bool)
                                     and 0 <= v.fraction < 1):
        raise ConfigError(f"validation.fraction {v.fraction!r} must be 'auto' or a number in [0, 1)")
    if d.mirror not in ("left-right", "all", "none"):
        raise ConfigError(f"data.mirror {d.mirror!r} must be left-right, all or none")
    if not 0 <= d.foreground <= 1:
        raise ConfigError(f"data.foreground {d.foreground} must be in [0, 1]")
    if o.iterations < 1 or o.lr <= 0:
        raise ConfigError(f"optim.iterations ({o.iterations}) and optim.lr ({o.lr}) must be positive")
    if o.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optim.optimizer {o.optimizer!r} must be sgd or adamw")
    if o.amp not in ("auto", "on", "off"):
        raise ConfigError(f"optim.amp {o.amp!r} must be auto, on or off")
    if config.objective.mixing not in ("uniform", "frequency"):
        raise ConfigError(f"objective.mixing {config.objective.mixing!r} must be uniform or frequency")
    if config.objective.gt_voxels not in ("annotated", "marginal"):
        raise ConfigError(f"objective.gt_voxels {config.objective.gt_voxels!r} must be annotated or marginal")
    if config.objective.rectify_target not in ("agree", "soft", "hard"):
        raise ConfigError(f"objective.rectify_target {config.objective.rectify_target!r} must be agree, soft or hard")
    if config.objective.self_target not in ("agree", "soft"):
        raise ConfigError(f"objective.self_target {config.objective.self_target!r} must be agree or soft")
    if config.objective.kt_form not in ("balanced", "paper"):
        raise ConfigError(f"objective.kt_form {config.objective.kt_form!r} must be balanced or paper")
    if not 0 <= config.objective.mixture_momentum < 1:
        raise ConfigError(f"objective.mixture_momentum {config.objective.mixture_momentum} must be in [0, 1)")
    if config.objective.kt_floor <= 0:
        raise ConfigError(f"objective.kt_floor {config.objective.kt_floor} must be positive")
    levels = len(config.network.widths) - 1
    if levels < 1 or not 1 <= config.network.feature_layer <= levels:
        raise ConfigError(f"network.feature_layer {config.network.feature_layer} must be in 1..{levels} "
                          f"for widths {config.network.widths}")
    deep = config.network.deep_supervision
    if deep != "auto" and not (isinstance(deep, int) and not isinstance(deep, bool) and 0 <= deep < levels):
        raise ConfigError(f"network.deep_supervision {deep!r} must be 'auto' or in 0..{levels - 1} "
                          f"for widths {config.network.widths}")
    if deep not in ("auto", 0) and config.network_type() != "unet3d":
        raise ConfigError(f"network.deep_supervision is a unet3d setting; {config.method} trains "
                          f"{config.network_type()}: set network.type=unet3d or leave it at 0")
    u = config.network.uxnet
    if len(u.depths) != 4 or len(u.widths) != 4 or min(u.depths + u.widths) < 1:
        raise ConfigError(f"network.uxnet.depths {u.depths} and widths {u.widths} must be four positive numbers each")
    if not 0 <= u.deep_supervision <= 3:
        raise ConfigError(f"network.uxnet.deep_supervision {u.deep_supervision} must be in 0..3 "
                          "(heads on the decoder maps at 1/2, 1/4, 1/8)")
    if u.query_dim % u.heads or u.queries < 3:
        raise ConfigError(f"network.uxnet: query_dim {u.query_dim} must be divisible by heads {u.heads}, and "
                          f"queries {u.queries} at least 3 (one per cluster-assignment group)")
    if config.objective.pseudo_views not in ("same", "weak-strong"):
        raise ConfigError(f"objective.pseudo_views {config.objective.pseudo_views!r} must be same or weak-strong")
    if not 0 <= config.objective.confidence < 1:
        raise ConfigError(f"objective.confidence {config.objective.confidence} must be in [0, 1)")
    for name in ("patch", "stride"):
        value = getattr(config.inference, name)
        if value is not None and not (len(value) == 3 and all(v > 0 for v in value)):
            raise ConfigError(f"inference.{name} {value!r} must be three positive integers [z, y, x]")


def _build(cls, data: typing.Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of settings, not {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {sorted(known)}"
            raise ConfigError(f"unknown setting '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**values)


def _coerce(value, kind, key: str):
    if kind is typing.Any:
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"setting {key!r} must be a list, not {value!r}")
        return [_coerce(v, item, key) for v in value]
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"setting {key!r} must be a number, not {value!r}")
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"setting {key!r} must be true or false, not {value!r}")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"setting {key!r} must be a whole number, not {value!r}")
    if kind is str and isinstance(value, bool):  # YAML reads a bare on / off as true / false
        return "on" if value else "off"
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"setting {key!r} must be text, not {value!r}")
    return value
