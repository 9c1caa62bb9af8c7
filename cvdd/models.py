"""Model registry with low-resolution stems and a width multiplier, and checkpoints.

Every architecture is built from torchvision's building blocks, for any channel count
and any input size from 8 px up. Inputs of 64 px or less get the low-resolution stem
used for CIFAR-sized data: a 3x3 stride-1 first convolution and no max-pool. The width
multiplier scales every channel count, so that a five-member committee trains on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import DenseNet, MobileNetV2, ShuffleNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck

from .errors import CheckpointError, ConfigError

LOW_RESOLUTION_MAX = 64
MIN_IMAGE_SIZE = 8
CHECKPOINT_FORMAT = 1


def _scaled(channels: int, width: float, multiple: int = 1, minimum: int = 4) -> int:
    """Return `channels * width` rounded to a multiple of `multiple`, at least `minimum`."""
    value = max(minimum, int(round(channels * width / multiple)) * multiple)
    return max(value, multiple)


class ResNet(nn.Module):
    """ResNet built from torchvision's BasicBlock or Bottleneck with scaled widths.

    torchvision's own ResNet class fixes the stage widths at 64 to 512, so this
    class repeats its layout with every width multiplied by `width`.
    """

    def __init__(self, block, layers, num_classes, channels, low_resolution, width):
        super().__init__()
        widths = [_scaled(64 * 2**i, width) for i in range(4)]
        self.inplanes = widths[0]
        if low_resolution:
            self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_stage(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_stage(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_stage(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, block, planes, blocks, stride):
        downsample = None
        out_channels = planes * block.expansion
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def features(self, x):
        """Return the pooled penultimate features, shape (N, D)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature.

    `depth` blocks of 3x3 convolution, normalisation, ReLU and 2x2 average pooling,
    then a linear classifier. Pooling stops once the feature map is 1 px, so depth 4
    also works on 8 px inputs.
    """

    def __init__(self, num_classes, channels, image_size, width=1.0, depth=3, norm="batch"):
        super().__init__()
        hidden = _scaled(128, width)
        layers: list[nn.Module] = []
        size = image_size
        in_channels = channels
        for _ in range(depth):
            layers.append(nn.Conv2d(in_channels, hidden, 3, padding=1))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(hidden))
            elif norm == "instance":
                layers.append(nn.GroupNorm(hidden, hidden, affine=True))
            layers.append(nn.ReLU(inplace=True))
            if size >= 2:
                layers.append(nn.AvgPool2d(2))
                size //= 2
            in_channels = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden * size * size, num_classes)

    def features(self, x):
        return torch.flatten(self.body(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def _build_resnet(block, layers):
    def build(num_classes, channels, image_size, width):
        return ResNet(block, layers, num_classes, channels, image_size <= LOW_RESOLUTION_MAX, width)

    return build


def _build_densenet121(num_classes, channels, image_size, width):
    growth = max(2, int(round(32 * width)))
    model = DenseNet(
        growth_rate=growth,
        block_config=(6, 12, 24, 16),
        num_init_features=2 * growth,
        num_classes=num_classes,
    )
    stem_channels = model.features.conv0.out_channels
    if image_size <= LOW_RESOLUTION_MAX:
        model.features.conv0 = nn.Conv2d(channels, stem_channels, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    else:
        model.features.conv0 = nn.Conv2d(channels, stem_channels, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    return model


def _build_mobilenet_v2(num_classes, channels, image_size, width):
    model = MobileNetV2(num_classes=num_classes, width_mult=width)
    stem = model.features[0][0]
    stride = 1 if image_size <= LOW_RESOLUTION_MAX else 2
    model.features[0][0] = nn.Conv2d(channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    if image_size <= LOW_RESOLUTION_MAX:
        # The usual CIFAR adaptation also keeps the first 24-channel stage at stride 1,
        # so the network downsamples 8x in all instead of 32x.
        model.features[2].conv[1][0].stride = (1, 1)
    return model


def _build_shufflenet_v2(num_classes, channels, image_size, width):
    # Stage widths of the 1.0x model, scaled; a ShuffleNet unit splits channels in two,
    # so every width must be even.
    stage_channels = [_scaled(c, width, multiple=2) for c in (24, 116, 232, 464)]
    last = _scaled(1024, width, multiple=2, minimum=16)
    model = ShuffleNetV2([4, 8, 4], stage_channels + [last], num_classes=num_classes)
    if image_size <= LOW_RESOLUTION_MAX:
        model.conv1[0] = nn.Conv2d(channels, stage_channels[0], 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1[0] = nn.Conv2d(channels, stage_channels[0], 3, stride=2, padding=1, bias=False)
    return model


def _build_convnet(depth, norm):
    def build(num_classes, channels, image_size, width):
        return ConvNet(num_classes, channels, image_size, width=width, depth=depth, norm=norm)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _build_resnet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": _build_resnet(Bottleneck, [3, 4, 6, 3]),
    "resnet101": _build_resnet(Bottleneck, [3, 4, 23, 3]),
    "densenet121": _build_densenet121,
    "mobilenet_v2": _build_mobilenet_v2,
    "shufflenet_v2": _build_shufflenet_v2,
    "convnet": _build_convnet(3, "batch"),
    "convnet4": _build_convnet(4, "batch"),
    "convnet_in": _build_convnet(3, "instance"),
}


def list_models() -> list[str]:
    """Return the registered architecture names."""
    return sorted(_REGISTRY)


def check_arch(arch: str) -> None:
    if arch not in _REGISTRY:
        raise ConfigError(f"unknown model name {arch!r}; choose one of: {', '.join(list_models())}")


def create_model(arch: str, num_classes: int, channels: int = 3, image_size: int = 32, width: float = 1.0) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        arch: a name from :func:`list_models`.
        num_classes: size of the output layer.
        channels: input channels (1 for greyscale, 3 for RGB).
        image_size: input side length in pixels; 64 or less selects the low-resolution stem.
        width: channel multiplier; 1.0 is the published width.

    Raises:
        ConfigError: for an unknown name, a width of 0 or less, or an image under 8 px.
    """
    check_arch(arch)
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ConfigError(f"model width {width!r} is invalid; use a multiplier greater than 0, such as 0.25")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image size {image_size} px is too small; models need at least {MIN_IMAGE_SIZE} px")
    if num_classes < 2:
        raise ConfigError(f"num_classes {num_classes} is invalid; a classifier needs at least 2 classes")
    return _REGISTRY[arch](num_classes, channels, image_size, float(width))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints ---------------------------------------------------------------------------


def strip_module_prefix(state_dict: dict) -> dict:
    """Remove the `module.` prefix that DistributedDataParallel adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def checkpoint_payload(model, *, arch, width, dataset, accuracy, config) -> dict:
    """Return the dict that a member checkpoint stores: weights plus the metadata to check them."""
    module = model.module if hasattr(model, "module") else model
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "width": float(width),
        "num_classes": dataset.num_classes,
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "class_names": list(dataset.class_names),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "accuracy": accuracy,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }


def check_checkpoint_matches(meta: dict, dataset, source: str) -> None:
    """Raise CheckpointError if a checkpoint was made for another class list or input shape."""
    names = list(meta.get("class_names", []))
    expected = list(dataset.class_names)
    if names != expected:
        if sorted(names) == sorted(expected):
            detail = "the same classes in another order"
        else:
            missing = sorted(set(expected) - set(names))[:3]
            extra = sorted(set(names) - set(expected))[:3]
            detail = f"another class list (missing {missing}, extra {extra})"
        raise CheckpointError(
            f"checkpoint {source} was trained on {detail} than dataset {dataset.name!r}; "
            "retrain it on this dataset or use the class order it was trained with"
        )
    for key, expected_value in (("channels", dataset.channels), ("image_size", dataset.image_size)):
        if meta.get(key) != expected_value:
            raise CheckpointError(
                f"checkpoint {source} expects {key} {meta.get(key)} but dataset {dataset.name!r} has "
                f"{expected_value}; retrain it on this dataset"
            )


def load_checkpoint(path: str | Path, dataset=None, map_location="cpu") -> tuple[nn.Module, dict]:
    """Load a member checkpoint into a freshly built model.

    Args:
        path: a file written by :func:`checkpoint_payload` and `torch.save`.
        dataset: if given, the checkpoint's class names, channels and image size must match it.

    Returns:
        (model in eval mode, metadata dict without the state dict)
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; train the committee first (cvdd pretrain)")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise CheckpointError(f"{str(path)!r} is not a cvdd checkpoint; it lacks 'arch' or 'state_dict'")
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    if dataset is not None:
        check_checkpoint_matches(meta, dataset, repr(str(path)))
    model = create_model(meta["arch"], meta["num_classes"], meta["channels"], meta["image_size"], meta["width"])
    model.load_state_dict(strip_module_prefix(payload["state_dict"]))
    model.eval()
    return model, meta
