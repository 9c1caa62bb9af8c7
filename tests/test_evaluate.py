"""Tests of cvdd.evaluate and the augmentation it uses (cvdd.augment).

Students and teachers are width-0.125 ConvNets on the 8 px digits, trained for two or
three epochs on at most 21 images, so each test takes about a second on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvdd.evaluate
from cvdd.augment import (
    CropParams,
    apply_crop,
    apply_cutmix,
    random_roll,
    sample_crop_params,
    sample_cutmix,
)
from cvdd.config import EvalConfig
from cvdd.data import load_digits_dataset
from cvdd.errors import CvddError
from cvdd.evaluate import Committee, check_class_names, smoothed_lr_factor, train_student
from cvdd.models import create_model

WIDTH = 0.125


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def distilled_images(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first `count` train images as floats in [0, 1] with their labels."""
    images = dataset.train.get(range(count)).float() / 255.0
    return images, dataset.train.labels[:count].clone()


def frozen_teacher(dataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("convnet", dataset.num_classes, dataset.channels, dataset.image_size, WIDTH)
    model.train()
    with torch.no_grad():
        model(dataset.normalize(dataset.train.get(range(256))))
    return model.eval().requires_grad_(False)


# --- smoothed_lr_factor -------------------------------------------------------------------------


def test_lr_factor_eta_1():
    assert smoothed_lr_factor(0, 300, 1.0) == pytest.approx(1.0)
    assert smoothed_lr_factor(150, 300, 1.0) == pytest.approx(0.5)
    # 0.5 * (1 - cos(pi / 300)) is about (pi / 300)^2 / 4 = 2.7416e-5.
    assert smoothed_lr_factor(299, 300, 1.0) == pytest.approx(2.7416e-5, rel=1e-3)


def test_lr_factor_eta_2():
    assert smoothed_lr_factor(0, 300, 2.0) == pytest.approx(1.0)
    # 0.5 * (1 + cos(pi / 4)) = 0.5 * (1 + 0.70710678).
    assert smoothed_lr_factor(150, 300, 2.0) == pytest.approx(0.85355339, abs=1e-8)
    # 0.5 * (1 + sin(pi / 600)), with sin(pi / 600) about 0.0052360: just above one half.
    assert smoothed_lr_factor(299, 300, 2.0) == pytest.approx(0.5026180, abs=1e-6)


def test_lr_factor_three_epochs():
    # 0.5 * (1 + cos(pi * e / 3)) for e = 0, 1, 2: cos gives 1, 1/2, -1/2.
    factors = [smoothed_lr_factor(e, 3, 1.0) for e in range(3)]
    assert factors == pytest.approx([1.0, 0.75, 0.25])


# --- train_student ------------------------------------------------------------------------------


def fake_accuracies(monkeypatch, values: list[float]) -> list[int]:
    """Make evaluate_top1 return `values` in turn; returns the list of calls, filled as they happen."""
    remaining = list(values)
    calls = []

    def evaluate_top1(model, split, dataset, device, *args, **kwargs):
        calls.append(len(calls))
        return remaining.pop(0)

    monkeypatch.setattr(cvdd.evaluate, "evaluate_top1", evaluate_top1)
    return calls


def test_student_final_and_best_top1(digits, monkeypatch):
    fake_accuracies(monkeypatch, [0.6, 0.5, 0.4])
    images, labels = distilled_images(digits, 10)
    cfg = EvalConfig(epochs=3, eval_every=1, batch_size=10, lr=0.001)

    result = train_student(images, labels, digits, cfg, "convnet", WIDTH, torch.device("cpu"), seed=0,
                           label_mode="hard")

    assert result["top1"] == 0.4
    assert result["best_top1"] == 0.6
    assert result["best_epoch"] == 1
    assert [record["test_top1"] for record in result["curve"]] == [0.6, 0.5, 0.4]
    # lr * 0.5 * (1 + cos(pi * e / 3)) for e = 0, 1, 2.
    assert [record["lr"] for record in result["curve"]] == pytest.approx([0.001, 0.00075, 0.00025])


def test_student_evaluates_every_and_last(digits, monkeypatch):
    calls = fake_accuracies(monkeypatch, [0.3, 0.7])
    images, labels = distilled_images(digits, 10)
    cfg = EvalConfig(epochs=3, eval_every=2, batch_size=10)

    result = train_student(images, labels, digits, cfg, "convnet", WIDTH, torch.device("cpu"), seed=0,
                           label_mode="hard")

    assert len(calls) == 2
    tested = [record["epoch"] for record in result["curve"] if "test_top1" in record]
    assert tested == [2, 3]
    assert result["top1"] == 0.7
    assert result["best_epoch"] == 3


def test_student_soft_without_committee(digits):
    images, labels = distilled_images(digits, 10)
    with pytest.raises(CvddError, match="teachers"):
        train_student(images, labels, digits, EvalConfig(epochs=1), "convnet", WIDTH, torch.device("cpu"),
                      seed=0, committee=None, label_mode="soft")


class RecordingTeacher(nn.Module):
    """A teacher that stores a copy of every batch it labels."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def record_student_inputs(monkeypatch) -> list[torch.Tensor]:
    """Make train_student's student store every training batch that reaches its first convolution."""
    inputs: list[torch.Tensor] = []
    build = cvdd.evaluate.create_model

    def create_recording_model(*args, **kwargs):
        model = build(*args, **kwargs)
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

        def record(module, args):
            if module.training:
                inputs.append(args[0].detach().clone())

        first_conv.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(cvdd.evaluate, "create_model", create_recording_model)
    return inputs


@pytest.mark.parametrize("bssl", [True, False])
def test_teachers_see_student_batch(digits, monkeypatch, bssl):
    student_inputs = record_student_inputs(monkeypatch)
    fake_accuracies(monkeypatch, [0.5, 0.5])
    teacher = RecordingTeacher(frozen_teacher(digits))
    committee = Committee({"teacher": teacher}, torch.ones(1), list(digits.class_names))
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    images, labels = distilled_images(digits, 21)
    cfg = EvalConfig(epochs=2, eval_every=1, batch_size=16, cutmix_alpha=1.0, bssl=bssl)

    train_student(images, labels, digits, cfg, "convnet", WIDTH, torch.device("cpu"), seed=0,
                  committee=committee, label_mode="soft")

    # 21 images at batch size 16: batches of 16 and 5 in each of 2 epochs.
    assert [len(x) for x in student_inputs] == [16, 5, 16, 5]
    assert len(teacher.inputs) == len(student_inputs)
    for index, (seen_by_teacher, seen_by_student) in enumerate(zip(teacher.inputs, student_inputs)):
        assert torch.equal(seen_by_teacher, seen_by_student), f"batch {index} differs"
    after = teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"teacher state dict entry {key!r} changed"
    assert not teacher.inner.training


def test_last_batch_of_one_joins_previous(digits, monkeypatch):
    student_inputs = record_student_inputs(monkeypatch)
    fake_accuracies(monkeypatch, [0.5])
    images, labels = distilled_images(digits, 17)
    cfg = EvalConfig(epochs=1, eval_every=1, batch_size=16)

    result = train_student(images, labels, digits, cfg, "convnet", WIDTH, torch.device("cpu"), seed=0,
                           label_mode="hard")

    assert [len(x) for x in student_inputs] == [17]
    assert result["protocol"]["num_images"] == 17


def test_student_same_seed_same_curve(digits):
    images, labels = distilled_images(digits, 20)
    teacher = frozen_teacher(digits)
    committee = Committee({"teacher": teacher}, torch.ones(1), list(digits.class_names))
    cfg = EvalConfig(epochs=2, eval_every=1, batch_size=10)

    runs = [train_student(images, labels, digits, cfg, "convnet", WIDTH, torch.device("cpu"), seed=3,
                          committee=committee, label_mode="soft") for _ in range(2)]

    assert [r["loss"] for r in runs[0]["curve"]] == [r["loss"] for r in runs[1]["curve"]]
    assert runs[0]["top1"] == runs[1]["top1"]
    assert 0.0 <= runs[0]["top1"] <= 1.0
    assert runs[0]["protocol"]["teachers"] == ["teacher"]


# --- Committee.soft_labels ----------------------------------------------------------------------


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    exponentials = (z - z.max(dim=1, keepdim=True).values).exp()
    return exponentials / exponentials.sum(dim=1, keepdim=True)


def test_soft_labels_bssl_uses_batch_statistics(digits):
    teacher = frozen_teacher(digits)
    x = digits.normalize(digits.train.get(range(12)))
    # Train mode normalises with batch statistics; the copy keeps the teacher's buffers untouched.
    with torch.no_grad():
        batch_logits = copy.deepcopy(teacher).train()(x)
        running_logits = teacher(x)
    committee = Committee({"teacher": teacher}, torch.ones(1), list(digits.class_names))

    with_bssl = committee.soft_labels(x, tau=4.0, bssl=True, space="prob")
    without_bssl = committee.soft_labels(x, tau=4.0, bssl=False, space="prob")

    assert torch.allclose(with_bssl, softmax_rows(batch_logits / 4.0), atol=1e-5)
    assert torch.allclose(without_bssl, softmax_rows(running_logits / 4.0), atol=1e-5)


# --- check_class_names --------------------------------------------------------------------------


def test_check_class_names_match(digits):
    check_class_names({"class_names": list(digits.class_names)}, digits)
    check_class_names({"class_names": list(digits.class_names)}, digits, list(digits.class_names))


def test_check_class_names_dataset_differs(digits):
    reordered = list(reversed(digits.class_names))
    with pytest.raises(CvddError, match="distil it again"):
        check_class_names({"class_names": reordered, "method": "cvdd"}, digits)


def test_check_class_names_missing_list(digits):
    with pytest.raises(CvddError):
        check_class_names({"method": "cvdd"}, digits)


def test_check_class_names_committee_differs(digits):
    names = list(digits.class_names)
    with pytest.raises(CvddError, match="teachers"):
        check_class_names({"class_names": names}, digits, names[1:] + names[:1])


# --- CutMix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 32])
def test_cutmix_pasted_area_is_one_minus_lam(size):
    batch = 6
    # Image i is constant at i + 1, so a changed pixel shows exactly where a partner was pasted.
    images = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 2, size, size)
    generator = torch.Generator().manual_seed(0)
    pasted_any = False

    for _ in range(40):
        params = sample_cutmix(batch, size, alpha=1.0, generator=generator)
        mixed = apply_cutmix(images, params)
        box = torch.zeros(size, size, dtype=torch.bool)
        box[params.top:params.top + params.height, params.left:params.left + params.width] = True
        assert params.top >= 0
        assert params.top + params.height <= size
        assert params.left >= 0
        assert params.left + params.width <= size

        for i in range(batch):
            partner = int(params.permutation[i])
            changed = (mixed[i] != images[i]).any(dim=0)
            if partner == i:
                assert not changed.any(), f"image {i} is its own partner but changed"
                continue
            pasted_any = pasted_any or bool(changed.any())
            assert float(changed.sum()) / (size * size) == pytest.approx(1.0 - params.lam, abs=1e-12)
            assert torch.equal(changed, box), f"image {i}: changed pixels are not the CutMix box"
            assert (mixed[i][:, box] == partner + 1).all()

    assert pasted_any, "no draw pasted a box"


def test_cutmix_label_mixture_matches_area():
    batch, classes, size = 5, 5, 16
    labels = torch.tensor([3, 0, 4, 1, 2])
    # Channel c of image i is 1 everywhere if labels[i] == c, else 0. So the channel means of a
    # mixed image are the share of its area that each class's pixels cover.
    one_hot = F.one_hot(labels, classes).float()
    images = one_hot.view(batch, classes, 1, 1).expand(batch, classes, size, size).contiguous()
    generator = torch.Generator().manual_seed(1)

    for _ in range(20):
        params = sample_cutmix(batch, size, alpha=1.0, generator=generator)
        mixed = apply_cutmix(images, params)
        expected = params.lam * one_hot + (1.0 - params.lam) * one_hot[params.permutation]
        assert torch.allclose(mixed.mean(dim=(2, 3)), expected, atol=1e-6)


def test_cutmix_seeded():
    first = sample_cutmix(8, 16, generator=torch.Generator().manual_seed(5))
    second = sample_cutmix(8, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.permutation, second.permutation)
    assert (first.top, first.left, first.height, first.width, first.lam) == \
        (second.top, second.left, second.height, second.width, second.lam)
    assert sorted(first.permutation.tolist()) == list(range(8))


def test_cutmix_keeps_input():
    images = torch.rand(4, 1, 8, 8)
    original = images.clone()
    params = sample_cutmix(4, 8, generator=torch.Generator().manual_seed(2))
    apply_cutmix(images, params)
    assert torch.equal(images, original)


# --- RandomResizedCrop and flip -----------------------------------------------------------------


def boxes(batch: int, top, left, height, width, flip) -> CropParams:
    def column(value, dtype=torch.float32):
        return torch.full((batch,), value, dtype=dtype)

    return CropParams(column(top), column(left), column(height), column(width), column(flip, torch.bool))


def test_crop_full_image_identity():
    images = torch.rand(3, 2, 8, 8)
    result = apply_crop(images, boxes(3, 0, 0, 8, 8, False))
    assert torch.allclose(result, images, atol=1e-5)


def test_crop_full_image_flip():
    images = torch.rand(3, 2, 8, 8)
    result = apply_crop(images, boxes(3, 0, 0, 8, 8, True))
    assert torch.allclose(result, images.flip(3), atol=1e-5)


def test_crop_box_same_size_is_slice():
    images = torch.rand(2, 1, 8, 8)
    result = apply_crop(images, boxes(2, 2, 3, 4, 4, False), out_size=4)
    assert torch.allclose(result, images[:, :, 2:6, 3:7], atol=1e-5)


def test_crop_half_size_averages_pixel_pairs():
    images = torch.rand(2, 1, 8, 8)
    # Bilinear resampling from 8 to 4 px samples halfway between pixel pairs: a 2x2 mean.
    result = apply_crop(images, boxes(2, 0, 0, 8, 8, False), out_size=4)
    assert torch.allclose(result, F.avg_pool2d(images, 2), atol=1e-5)


def test_crop_keeps_gradient():
    images = torch.rand(2, 1, 8, 8, requires_grad=True)
    apply_crop(images, boxes(2, 1, 1, 5, 6, True)).sum().backward()
    assert images.grad is not None
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [8, 32, 224])
def test_crop_boxes_inside_and_within_scale(size):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    params = sample_crop_params(2000, size, scale=scale, ratio=ratio, generator=torch.Generator().manual_seed(0))
    top, left, height, width = params.top, params.left, params.height, params.width

    assert (top >= 0).all()
    assert (left >= 0).all()
    assert (height >= 1).all()
    assert (width >= 1).all()
    assert (top + height <= size).all()
    assert (left + width <= size).all()
    assert torch.equal(top, top.floor())
    assert torch.equal(left, left.floor())

    # Width and height are rounded to whole pixels, so the unrounded box lies within half a pixel of each.
    area = float(size * size)
    assert ((height + 0.5) * (width + 0.5) >= scale[0] * area).all()
    assert ((height - 0.5) * (width - 0.5) <= scale[1] * area).all()
    full = (height == size) & (width == size)
    aspect_high = (width + 0.5) / (height - 0.5)
    aspect_low = (width - 0.5) / (height + 0.5)
    assert ((aspect_high >= ratio[0]) | full).all()
    assert ((aspect_low <= ratio[1]) | full).all()
    if size == 224:
        fraction = height * width / area
        assert fraction.min() >= 0.07
        assert fraction.max() <= 1.0
        # Uniform area fractions in [0.08, 1] have mean 0.54. Large boxes with a skewed aspect do not
        # fit and are drawn again, which pulls the mean of the kept boxes down (0.48 with this seed).
        assert 0.42 < float(fraction.mean()) < 0.6


def test_crop_fallback_full_image():
    # A 2:1 to 3:1 aspect at the full area never fits a square image, so every attempt fails.
    params = sample_crop_params(50, 16, scale=(1.0, 1.0), ratio=(2.0, 3.0), flip=False,
                                generator=torch.Generator().manual_seed(0))
    assert (params.top == 0).all()
    assert (params.left == 0).all()
    assert (params.height == 16).all()
    assert (params.width == 16).all()


def test_crop_flip_draws():
    no_flip = sample_crop_params(500, 8, flip=False, generator=torch.Generator().manual_seed(0))
    with_flip = sample_crop_params(500, 8, flip=True, generator=torch.Generator().manual_seed(0))
    assert not no_flip.flip.any()
    assert 150 < int(with_flip.flip.sum()) < 350


def test_crop_params_seeded():
    first = sample_crop_params(16, 32, generator=torch.Generator().manual_seed(9))
    second = sample_crop_params(16, 32, generator=torch.Generator().manual_seed(9))
    for field in ("top", "left", "height", "width", "flip"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field


def test_random_roll_is_one_batch_shift():
    images = torch.rand(3, 1, 8, 8)
    rolled = random_roll(images, 2, generator=torch.Generator().manual_seed(0))
    shifts = [(a, b) for a in range(-2, 3) for b in range(-2, 3)
              if torch.equal(rolled, torch.roll(images, shifts=(a, b), dims=(2, 3)))]
    assert len(shifts) == 1
    assert random_roll(images, 0) is images
