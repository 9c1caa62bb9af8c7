"""Typed configs for every stage, loaded from YAML with command-line overrides.

A config file is a YAML mapping whose top-level sections match the fields of
:class:`RunConfig`. Loading checks every key, type and range, so a typo or an
out-of-range value stops the run before anything is written, with a message
that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError


def _range(minimum=None, maximum=None, *, exclusive_min=False):
    """Field metadata that bounds a number; checked on load."""
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


def _num(default, minimum=None, maximum=None, *, exclusive_min=False):
    return field(default=default, metadata=_range(minimum, maximum, exclusive_min=exclusive_min))


# Fields added after runs were made carry this flag. At their legacy value they are left out
# of fingerprints, so the work a run finished before the field existed is still recognised.
# The legacy value is what the code did back then: the default, unless `legacy` names another.
ADDED_LATER = "added_later"
LEGACY_VALUE = "legacy_value"


def _later(default=None, minimum=None, maximum=None, *, factory=None, exclusive_min=False, legacy=MISSING):
    metadata = {**_range(minimum, maximum, exclusive_min=exclusive_min), ADDED_LATER: True}
    if legacy is not MISSING:
        metadata[LEGACY_VALUE] = legacy
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Dataset kind, location and decoding options."""

    dataset: Literal["digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder"] = "digits"
    # Folder or archive (.zip, .tar, .tar.gz) holding the data; unused for digits.
    root: Optional[str] = None
    # Let torchvision download cifar10, cifar100, mnist or fashion-mnist into root.
    download: bool = False
    # File with one class name per line, giving the class index order of an imagefolder.
    class_order: Optional[str] = None
    # Side length in pixels that imagefolder images are resized to; null keeps the native size.
    image_size: Optional[int] = _num(None, 8)
    # Colour channels of imagefolder images: 1 decodes as greyscale, 3 as RGB.
    channels: int = _num(3, 1, 3)
    # Folder of the decoded uint8 tensor cache; null uses $CVDD_CACHE or ~/.cache/cvdd.
    cache_dir: Optional[str] = None
    # DataLoader workers for images larger than 64 px, which stream from disk.
    num_workers: int = _num(2, 0)


@dataclass
class CommitteeConfig:
    """The committee members and their width."""

    members: list[str] = field(
        default_factory=lambda: ["resnet18", "resnet50", "densenet121", "shufflenet_v2", "mobilenet_v2"]
    )
    # Channel multiplier of every member; 1.0 is the architecture's published width.
    width: float = _num(1.0, 0.0, exclusive_min=True)
    # Per-member width overrides, for example {resnet50: 0.5}.
    widths: dict[str, float] = field(default_factory=dict)
    # Per-member epoch overrides of train.epochs, for example {resnet50: 5}.
    epochs: dict[str, int] = field(default_factory=dict)
    # Per-member overrides of any train key, for example {resnet18: {augment: false, epochs: 40}}
    # for the overfitted-member check; applied after committee.epochs.
    train: dict[str, dict[str, Any]] = _later(factory=dict)

    def validate(self):
        from .models import check_arch

        if not self.members:
            raise ConfigError("config key 'committee.members' is empty; list at least one architecture")
        if len(set(self.members)) != len(self.members):
            raise ConfigError(f"config key 'committee.members' lists a member twice: {self.members}; list each once")
        for arch in self.members:
            check_arch(arch)
        for arch, value in self.widths.items():
            check_arch(arch)
            if value <= 0:
                raise ConfigError(f"config key 'committee.widths.{arch}' has value {value}; it must be greater than 0")
        for arch, value in self.epochs.items():
            check_arch(arch)
            if value < 1:
                raise ConfigError(f"config key 'committee.epochs.{arch}' has value {value}; it must be at least 1")
        for arch, value in self.train.items():
            check_arch(arch)
            if not isinstance(value, dict):
                raise ConfigError(f"config key 'committee.train.{arch}' has value {value!r}; expected a mapping of "
                                  "train keys, such as {augment: false}")
            _build(TrainConfig, value, f"committee.train.{arch}")


@dataclass
class TrainConfig:
    """Supervised training of the committee members (paper appendix, tables 17 to 23)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = _num(0.01, 0.0, exclusive_min=True)
    momentum: float = _num(0.9, 0.0, 1.0)
    weight_decay: float = _num(1e-4, 0.0)
    batch_size: int = _num(64, 1)
    epochs: int = _num(10, 1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    # Scale range of RandomResizedCrop, as a fraction of the image area.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    # False trains on the images as they are, with no crop and no flip.
    augment: bool = True
    # bf16 runs forward passes under torch.autocast with bfloat16 (CPU and CUDA).
    precision: Literal["fp32", "bf16"] = "fp32"
    label_smoothing: float = _num(0.0, 0.0, 1.0)
    eval_batch_size: int = _num(500, 1)


METHODS = ("random", "sre2l", "sre2l++", "cvdd")


@dataclass
class SynthesisConfig:
    """Image synthesis for sre2l, sre2l++ and cvdd (paper table 16 and the public code)."""

    ipc: int = _num(10, 1)
    iterations: int = _num(2000, 1)
    lr: float = _num(0.25, 0.0, exclusive_min=True)
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = _num(1e-8, 0.0, exclusive_min=True)
    # Classes per synthesis batch (one image per class); null: all classes if fewer than 100, else 100.
    batch_size: Optional[int] = _num(None, 1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # Maximum roll offset in pixels after cropping; null: 4 up to 64 px (1 at 8 px), 32 above.
    roll: Optional[int] = _num(None, 0)
    # Coefficient lambda of the BN-matching term.
    r_bn: float = _num(0.01, 0.0)
    bn_form: Literal["norm", "squared"] = "norm"
    bn_reduction: Literal["sum", "mean"] = "sum"
    first_bn_multiplier: float = _num(10.0, 0.0)
    # Initialisation: auto is noise for sre2l and real images for sre2l++ and cvdd.
    init: Literal["auto", "real", "noise"] = "auto"
    # The single member of sre2l and sre2l++; null: the first committee member.
    member: Optional[str] = None
    # CV-DD: number of experts N drawn per batch, temperature T, voter strategy.
    experts: int = _num(2, 1)
    temperature: float = _num(5.0, 0.0, exclusive_min=True)
    voter: Literal["prior", "equal", "random"] = "prior"
    online_reweighting: bool = False
    # Cross-entropy from all N experts, BN term from the strongest only.
    partial_aggregation: bool = False
    # When experts are drawn: per synthesis batch, or once per IPC index (the public code).
    draw: Literal["per_batch", "per_ipc"] = "per_batch"
    # Call the live-plot callback every this many iterations.
    callback_every: int = _num(10, 1)
    # Speed options, measured in BENCHMARKS.md: the experts' weights and inputs in channels-last
    # memory format, their forward passes under bf16 autocast, and each expert run through
    # torch.compile. All change the arithmetic slightly, so they are part of the fingerprint.
    channels_last: bool = _later(False)
    precision: Literal["fp32", "bf16"] = _later("fp32")
    compile: bool = _later(False)
    # BatchNorm layers of the experts that return their input statistics from the same call,
    # with one combined backward (cvdd.bn). false keeps the separate statistics hook, whose
    # images differ at float rounding. Runs made before this option existed used that hook,
    # so false is the value left out of fingerprints. Ignored with compile.
    fused_bn: bool = _later(True, legacy=False)


@dataclass
class EvalConfig:
    """Post-evaluation: students trained on the distilled set only (paper appendix G)."""

    students: list[str] = field(default_factory=lambda: ["resnet18"])
    # Student width multiplier; null: the committee's width.
    student_width: Optional[float] = _num(None, 0.0, exclusive_min=True)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    label_modes: list[Literal["soft", "hard"]] = field(default_factory=lambda: ["soft", "hard"])
    epochs: int = _num(300, 1)
    lr: float = _num(0.001, 0.0, exclusive_min=True)
    weight_decay: float = _num(0.01, 0.0)
    # null: 16, or 10 when the distilled set has at most 16 images.
    batch_size: Optional[int] = _num(None, 1)
    # Smoothed cosine schedule: factor 0.5 * (1 + cos(pi * e / (E * eta))).
    eta: float = _num(1.0, 1.0)
    # Softmax temperature of the KL loss.
    tau: float = _num(20.0, 0.0, exclusive_min=True)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # Beta(alpha, alpha) of CutMix; 0 turns CutMix off.
    cutmix_alpha: float = _num(1.0, 0.0)
    bssl: bool = True
    soft_label_space: Literal["prob", "logit"] = "prob"
    # Test top-1 is measured every this many epochs and at the last epoch.
    eval_every: int = _num(50, 1)
    # Soft labels: computed by the teachers for every batch ("onthefly"), or computed once per
    # distilled set into a label store and replayed by every student and seed ("stored"). Stored
    # labels draw the batch order and augmentation from augment_seed, shared by all seeds, and keep
    # the top label_top_k classes per image as float16.
    labels: Literal["onthefly", "stored"] = _later("onthefly")
    label_top_k: int = _later(10, 1)
    augment_seed: int = _later(0, 0)


@dataclass
class PriorConfig:
    """Prior performance by distill-and-evaluate (Algorithm 1)."""

    # Priors in percent given directly; when set, they are used instead of computing them.
    values: dict[str, float] = field(default_factory=dict)
    ipc: int = _num(10, 1)
    train_fraction: float = _num(0.8, 0.0, 1.0, exclusive_min=True)
    split_seed: int = _num(0, 0)
    # Training epochs of each member on the 80% split; null: the committee recipe.
    member_epochs: Optional[int] = _num(None, 1)
    # Synthesis iterations of the single-member distillation; null: synthesis.iterations.
    iterations: Optional[int] = _num(None, 1)
    student: str = "resnet18"
    # Student epochs; null: evaluate.epochs.
    student_epochs: Optional[int] = _num(None, 1)
    # Batch-statistics BatchNorm (BSSL) in the teacher of the prior's students. It is separate from
    # evaluate.bssl, so an ablation of BSSL in the post-evaluation reuses the priors and CV-DD set.
    bssl: bool = _later(True)


@dataclass
class RunConfig:
    """A whole run: the dataset, the committee and every stage's settings."""

    name: str = "run"
    # Run folder; null places it at runs/<name>.
    run_dir: Optional[str] = None
    seed: int = _num(0, 0)
    device: str = "auto"
    # CPU processes (one thread each) that train members, priors and students in parallel.
    workers: int = _num(1, 1)
    data: DataConfig = field(default_factory=DataConfig)
    committee: CommitteeConfig = field(default_factory=CommitteeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    methods: list[Literal["random", "sre2l", "sre2l++", "cvdd"]] = field(
        default_factory=lambda: ["random", "sre2l", "sre2l++", "cvdd"]
    )
    # Under torchrun: train each committee member and each student with DistributedDataParallel
    # across all ranks, instead of giving whole members and students to single ranks.
    ddp: bool = _later(False)
    # Tune without the test split: distil with the members Algorithm 1 trains on its
    # prior.train_fraction split, and test students on the held-out rest, under <run>/validation/.
    validation: bool = False

    def validate(self):
        from .models import check_arch

        members = self.committee.members
        if self.validation and self.prior.values:
            raise ConfigError(
                "config key 'validation' is true but prior.values is set; validation uses the members that "
                "Algorithm 1 trains on its split, so remove prior.values"
            )
        if self.synthesis.experts > len(members):
            raise ConfigError(
                f"config key 'synthesis.experts' has value {self.synthesis.experts} but the committee has "
                f"{len(members)} members; use at most {len(members)}"
            )
        if self.synthesis.member is not None and self.synthesis.member not in members:
            raise ConfigError(
                f"config key 'synthesis.member' has value {self.synthesis.member!r}, which is not a committee "
                f"member; choose one of {members}"
            )
        for name in self.evaluate.students + [self.prior.student]:
            check_arch(name)
        if self.prior.values:
            missing = [m for m in members if m not in self.prior.values]
            if missing:
                raise ConfigError(
                    f"config key 'prior.values' has no prior for member(s) {missing}; give every member a "
                    "value or remove prior.values to compute the priors"
                )
        for key, scale in (("train.crop_scale", self.train.crop_scale), ("synthesis.crop_scale",
                           self.synthesis.crop_scale), ("evaluate.crop_scale", self.evaluate.crop_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"config key '{key}' has value {list(scale)}; use 0 < min <= max <= 1")

    @property
    def single_member(self) -> str:
        """The member that sre2l and sre2l++ distill with."""
        return self.synthesis.member or self.committee.members[0]

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def member_width(self, arch: str) -> float:
        return self.committee.widths.get(arch, self.committee.width)

    def member_train(self, arch: str) -> TrainConfig:
        """Return the training settings of one member, with its epoch and train overrides applied."""
        train = self.train
        if arch in self.committee.epochs:
            train = dataclasses.replace(train, epochs=self.committee.epochs[arch])
        if arch in self.committee.train:
            data = config_to_dict(train)
            data.update(self.committee.train[arch])
            train = _build(TrainConfig, data, f"committee.train.{arch}")
        return train


# --- conversion from plain YAML data to dataclasses, with validation ------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str):
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail():
        raise ConfigError(f"config key '{key}' has value {value!r}; expected {_type_name(tp)}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for candidate in args:
            if candidate is type(None):
                continue
            try:
                return _convert(value, candidate, key)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if value in args:
            return value
        fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail()
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-4 as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for '{key}'")


def _check_range(value, meta, key: str):
    if value is None or not meta:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' has value {value!r}; it must be a finite number")
    minimum, maximum = meta.get("min"), meta.get("max")
    if minimum is not None:
        too_small = value <= minimum if meta.get("exclusive_min") else value < minimum
        if too_small:
            bound = f"greater than {minimum}" if meta.get("exclusive_min") else f"at least {minimum}"
            raise ConfigError(f"config key '{key}' has value {value!r}; it must be {bound}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"config key '{key}' has value {value!r}; it must be at most {maximum}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"unknown config key '{full}'; allowed keys here: {allowed}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        full = f"{prefix}.{name}" if prefix else name
        value = _convert(data[name], hints[name], full)
        _check_range(value, dict(f.metadata), full)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def config_from_dict(data: dict, cls=RunConfig):
    """Build and validate a config of type `cls` from plain data."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _build(cls, data)


def config_to_dict(cfg) -> dict:
    """Return the config as plain data (lists instead of tuples), for YAML and worker processes."""
    return _plain(dataclasses.asdict(cfg))


def _plain(data):
    """Turn tuples into lists, recursively, in plain data."""
    if isinstance(data, (tuple, list)):
        return [_plain(v) for v in data]
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `section.key=value` override to plain config data in place.

    The value is parsed as YAML, so `3`, `0.5`, `true`, `[a, b]` and `null` work.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} names no key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"override {assignment!r} has a value that is not valid YAML: {message}") from None
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls=RunConfig):
    """Load a YAML config, apply `section.key=value` overrides and validate the result."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            message = str(exc).replace("\n", " ")
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {message}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data, cls)


LABEL_STORE_KEYS = ("labels", "label_top_k", "augment_seed")


def without_label_store(eval_cfg: EvalConfig) -> EvalConfig:
    """Return `eval_cfg` with the stored-label keys at their defaults.

    Results that never read a label store (hard labels, on-the-fly soft labels, the priors'
    students) key on this view, so switching evaluate.labels to stored reuses them.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.name in LABEL_STORE_KEYS}
    return dataclasses.replace(eval_cfg, **defaults)


def hash_view(cfg) -> dict:
    """Return the config as plain data for hashing: fields added later are dropped at their default."""

    def view(obj):
        if not dataclasses.is_dataclass(obj):
            return obj
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get(ADDED_LATER):
                if LEGACY_VALUE in f.metadata:
                    legacy = f.metadata[LEGACY_VALUE]
                elif f.default_factory is not dataclasses.MISSING:
                    legacy = f.default_factory()
                else:
                    legacy = f.default
                if value == legacy:
                    continue
            out[f.name] = view(value)
        return out

    return _plain(view(cfg))


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def fingerprint(*parts) -> str:
    """Return a short stable hash of JSON-serialisable parts (configs, names, numbers)."""
    text = json.dumps([hash_view(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
