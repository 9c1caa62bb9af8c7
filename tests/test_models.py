"""Tests of the model registry, the low-resolution stems, the width multiplier and checkpoints."""

import dataclasses

import pytest
import torch
from torch import nn

from cvdd.data import load_digits_dataset
from cvdd.errors import CheckpointError, ConfigError
from cvdd.models import (
    checkpoint_payload,
    count_parameters,
    create_model,
    has_batchnorm,
    list_models,
    load_checkpoint,
)

MODELS = list_models()
IMAGE_SIZES = [8, 28, 32, 64]
CHANNELS = [1, 3]
NUM_CLASSES = 5
# The 72 model, size and channel combinations build and run at this width in well under a minute on a CPU.
SMALL_WIDTH = 0.125
RESNETS = [name for name in MODELS if name.startswith("resnet")]
WITHOUT_BATCHNORM = {"convnet_in"}


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def has_maxpool(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def train_briefly(model: nn.Module, dataset) -> None:
    """Run one SGD step so that weights and BatchNorm running statistics leave their initial values."""
    images = dataset.normalize(dataset.train.get(range(16)))
    labels = dataset.train.labels[:16]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    model.eval()


def save_checkpoint(tmp_path, model, dataset, name="member.pt", **overrides):
    payload = checkpoint_payload(
        model, arch="resnet18", width=SMALL_WIDTH, dataset=dataset, accuracy=0.5,
        config={"fingerprint": "0123456789abcdef", "seed": 0},
    )
    payload.update(overrides)
    path = tmp_path / name
    torch.save(payload, path)
    return path


def test_registry_lists_expected_models():
    expected = {"resnet18", "resnet50", "resnet101", "densenet121", "mobilenet_v2", "shufflenet_v2",
                "convnet", "convnet4", "convnet_in"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("arch", MODELS)
def test_output_shape_eval_and_train(arch, image_size, channels):
    torch.manual_seed(0)
    model = create_model(arch, NUM_CLASSES, channels, image_size, SMALL_WIDTH)
    images = torch.randn(2, channels, image_size, image_size)

    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    assert eval_logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(eval_logits).all()

    model.train()
    train_logits = model(images)
    assert train_logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(train_logits).all()


@pytest.mark.parametrize("arch", MODELS)
def test_batchnorm_presence(arch):
    model = create_model(arch, NUM_CLASSES, 3, 32, SMALL_WIDTH)
    if arch in WITHOUT_BATCHNORM:
        assert not has_batchnorm(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    else:
        assert has_batchnorm(model)


def test_convnet_in_groupnorm_per_channel():
    model = create_model("convnet_in", NUM_CLASSES, 3, 32, SMALL_WIDTH)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    for norm in norms:
        assert norm.num_groups == norm.num_channels


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("arch", MODELS)
def test_low_resolution_stem(arch, image_size):
    model = create_model(arch, NUM_CLASSES, 3, image_size, SMALL_WIDTH)
    conv = first_conv(model)
    assert conv.kernel_size == (3, 3)
    assert conv.stride == (1, 1)
    assert not has_maxpool(model)


@pytest.mark.parametrize("arch", RESNETS)
def test_resnet_low_resolution_modules(arch):
    model = create_model(arch, NUM_CLASSES, 1, 64, SMALL_WIDTH)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize("channels", CHANNELS)
def test_resnet18_imagenet_stem_above_64px(channels):
    model = create_model("resnet18", NUM_CLASSES, channels, 72, SMALL_WIDTH)
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert model.conv1.in_channels == channels
    assert isinstance(model.maxpool, nn.MaxPool2d)

    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, 72, 72))
    assert logits.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("arch", MODELS)
def test_parameters_shrink_with_width(arch):
    counts = [count_parameters(create_model(arch, NUM_CLASSES, 3, 32, width)) for width in (1.0, 0.5, 0.25)]
    assert counts[0] > counts[1], f"{arch} parameter counts at widths 1.0, 0.5, 0.25: {counts}"
    assert counts[1] > counts[2], f"{arch} parameter counts at widths 1.0, 0.5, 0.25: {counts}"


def test_create_model_unknown_name():
    with pytest.raises(ConfigError, match="notamodel") as info:
        create_model("notamodel", NUM_CLASSES)
    assert "resnet18" in str(info.value)


@pytest.mark.parametrize("width", [0, -1, 0.0, float("nan")])
def test_create_model_invalid_width(width):
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", NUM_CLASSES, width=width)
    assert f"width {width!r} " in str(info.value)


def test_create_model_too_small_image():
    with pytest.raises(ConfigError, match="4 px"):
        create_model("resnet18", NUM_CLASSES, image_size=4)


def test_checkpoint_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    train_briefly(model, digits)
    path = save_checkpoint(tmp_path, model, digits)

    loaded, meta = load_checkpoint(path, digits)

    assert not loaded.training
    images = digits.normalize(digits.test.get(range(8)))
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    original_state = model.state_dict()
    loaded_state = loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, loaded_state[key]), key


def test_checkpoint_metadata_fields(tmp_path, digits):
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    path = save_checkpoint(tmp_path, model, digits)

    _, meta = load_checkpoint(path, digits)

    assert "state_dict" not in meta
    assert meta["arch"] == "resnet18"
    assert meta["width"] == SMALL_WIDTH
    assert meta["num_classes"] == 10
    assert meta["image_size"] == 8
    assert meta["channels"] == 1
    assert meta["class_names"] == digits.class_names
    assert meta["mean"] == list(digits.mean)
    assert meta["std"] == list(digits.std)
    assert meta["accuracy"] == 0.5
    assert meta["config"] == {"fingerprint": "0123456789abcdef", "seed": 0}


def test_checkpoint_other_class_list_rejected(tmp_path, digits):
    letters = dataclasses.replace(digits, class_names=list("abcdefghij"))
    model = create_model("resnet18", letters.num_classes, letters.channels, letters.image_size, SMALL_WIDTH)
    path = save_checkpoint(tmp_path, model, letters)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, digits)
    message = str(info.value)
    assert "another class list" in message
    assert str(path) in message
    assert "'digits'" in message


def test_checkpoint_other_class_order_rejected(tmp_path, digits):
    reversed_digits = dataclasses.replace(digits, class_names=list(reversed(digits.class_names)))
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    path = save_checkpoint(tmp_path, model, reversed_digits)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, digits)
    message = str(info.value)
    assert "the same classes in another order" in message
    assert str(path) in message


def test_checkpoint_other_channels_rejected(tmp_path, digits):
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    path = save_checkpoint(tmp_path, model, digits)
    rgb_digits = dataclasses.replace(digits, channels=3)

    with pytest.raises(CheckpointError, match="channels 1"):
        load_checkpoint(path, rgb_digits)


def test_checkpoint_without_dataset_skips_check(tmp_path, digits):
    letters = dataclasses.replace(digits, class_names=list("abcdefghij"))
    model = create_model("resnet18", letters.num_classes, letters.channels, letters.image_size, SMALL_WIDTH)
    path = save_checkpoint(tmp_path, model, letters)

    _, meta = load_checkpoint(path)

    assert meta["class_names"] == list("abcdefghij")


def test_checkpoint_module_prefix_loads(tmp_path, digits):
    torch.manual_seed(0)
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    train_briefly(model, digits)
    prefixed = {f"module.{key}": value for key, value in model.state_dict().items()}
    path = save_checkpoint(tmp_path, model, digits, state_dict=prefixed)

    loaded, _ = load_checkpoint(path, digits)

    images = digits.normalize(digits.test.get(range(8)))
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_checkpoint_payload_unwraps_module(digits):
    model = create_model("resnet18", digits.num_classes, digits.channels, digits.image_size, SMALL_WIDTH)
    wrapped = nn.DataParallel(model)

    payload = checkpoint_payload(wrapped, arch="resnet18", width=SMALL_WIDTH, dataset=digits,
                                 accuracy=0.0, config={})

    assert payload["state_dict"].keys() == model.state_dict().keys()


def test_checkpoint_missing_file(tmp_path, digits):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(path, digits)
    assert str(path) in str(info.value)


def test_checkpoint_foreign_file_rejected(tmp_path, digits):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a cvdd checkpoint"):
        load_checkpoint(path, digits)
