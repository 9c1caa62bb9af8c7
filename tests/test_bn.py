"""Tests of cvdd.bn: statistic hooks, the BN-matching loss and the BSSL context.

Every expected statistic and loss is computed in the test from the layer inputs with
plain tensor arithmetic, not with the helpers under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cvdd.bn import BNStatisticsHook, batch_specific_bn, bn_matching_loss, require_batchnorm
from cvdd.errors import CvddError
from cvdd.models import create_model

EPS = 1e-5


def tiny_model() -> nn.Sequential:
    """Conv, BN, ReLU, Conv, BN: BatchNorm layers at module paths "1" and "4"."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5),
    ).eval()


def bn_first_model() -> nn.Sequential:
    """BN, Conv, BN: the first BatchNorm layer receives the raw batch."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
    ).eval()


def manual_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, H, W), written out as sums."""
    channels = x.shape[1]
    values = x.transpose(0, 1).reshape(channels, -1)
    count = values.shape[1]
    mean = values.sum(dim=1) / count
    var = ((values - mean[:, None]) ** 2).sum(dim=1) / count
    return mean, var


def randomise_running_stats(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert len(module._forward_pre_hooks) == 0, f"module {name!r} still has forward pre-hooks"
        assert len(module._forward_hooks) == 0, f"module {name!r} still has forward hooks"


# --- BNStatisticsHook ---------------------------------------------------------------------------


def test_hook_keys_are_module_paths():
    model = tiny_model()
    hook = BNStatisticsHook(model)

    assert list(hook.layers) == ["1", "4"]
    assert hook.layers["1"] is model[1]
    assert hook.layers["4"] is model[4]
    hook.remove()


def test_hook_captures_mean_and_biased_variance():
    model = tiny_model()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        first_input = model[0](x)
        second_input = model[3](model[2](model[1](first_input)))
    expected = {"1": manual_statistics(first_input), "4": manual_statistics(second_input)}

    with BNStatisticsHook(model) as hook:
        with torch.no_grad():
            model(x)
        captured = dict(hook.statistics)

    assert set(captured) == {"1", "4"}
    for name, (mean, var) in expected.items():
        captured_mean, captured_var = captured[name]
        assert captured_mean.shape == (model[int(name)].num_features,)
        assert torch.allclose(captured_mean, mean, atol=1e-6), name
        assert torch.allclose(captured_var, var, atol=1e-6), name


def test_hook_variance_is_biased():
    """Two values 0 and 2 per channel: biased variance 1, unbiased variance 2."""
    model = nn.Sequential(nn.BatchNorm2d(1)).eval()
    x = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)

    with BNStatisticsHook(model) as hook:
        model(x)
        mean, var = hook.statistics["0"]

    assert mean.item() == pytest.approx(1.0)
    assert var.item() == pytest.approx(1.0)


def test_hook_batchnorm1d_input():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(10, 4)
    with torch.no_grad():
        features = model[0](x)
    expected_mean = features.sum(dim=0) / 10
    expected_var = ((features - expected_mean) ** 2).sum(dim=0) / 10

    with BNStatisticsHook(model) as hook:
        with torch.no_grad():
            model(x)
        mean, var = hook.statistics["1"]

    assert torch.allclose(mean, expected_mean, atol=1e-6)
    assert torch.allclose(var, expected_var, atol=1e-6)


def test_hook_selected_layers_only():
    model = tiny_model()
    with BNStatisticsHook(model, layers=["4"]) as hook:
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))
        assert list(hook.layers) == ["4"]
        assert set(hook.statistics) == {"4"}
    assert_no_hooks(model)


def test_hook_remove_leaves_no_hooks():
    model = tiny_model()
    hook = BNStatisticsHook(model)
    assert len(model[1]._forward_pre_hooks) == 1
    assert len(model[4]._forward_pre_hooks) == 1

    hook.remove()

    assert_no_hooks(model)
    hook.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert hook.statistics == {}


def test_hook_context_manager_removes():
    model = tiny_model()
    with BNStatisticsHook(model):
        pass
    assert_no_hooks(model)


def test_hook_statistics_are_differentiable():
    model = tiny_model().requires_grad_(False)
    randomise_running_stats(model)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)

    with BNStatisticsHook(model) as hook:
        model(x)
        bn_matching_loss(hook).backward()

    assert x.grad is not None
    assert x.grad.abs().sum() > 0


# --- BNStatisticsHook(fused=True) ----------------------------------------------------------------


def recorded_inputs(model: nn.Module) -> tuple[dict, list]:
    """Record each BatchNorm layer's input (with its graph) through plain forward pre-hooks."""
    inputs = {}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
               for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    return inputs, handles


def manual_eval_bn(module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    normalised = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
    return normalised * module.weight.view(shape) + module.bias.view(shape)


def affine_tiny_model() -> nn.Sequential:
    model = tiny_model().requires_grad_(False)
    randomise_running_stats(model)
    generator = torch.Generator().manual_seed(5)
    for module in (model[1], model[4]):
        module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model


def test_fused_hook_statistics_and_output_match_hand_computed():
    model = affine_tiny_model()
    x = torch.randn(6, 3, 8, 8)
    inputs, handles = recorded_inputs(model)
    outputs = {}
    model[4].register_forward_hook(lambda m, args, out: outputs.__setitem__("4", out))

    with torch.no_grad(), BNStatisticsHook(model, fused=True) as hook:
        model(x)

    for name in ("1", "4"):
        mean, var = manual_statistics(inputs[name])
        torch.testing.assert_close(hook.statistics[name][0], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hook.statistics[name][1], var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["4"], manual_eval_bn(model[4], inputs["4"]), rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("terms", ["output and statistics", "means only", "variances only", "output only"])
def test_fused_gradient_matches_hand_computed(terms):
    # Each case leaves a different set of the fused layer's three outputs without a gradient.
    model = affine_tiny_model()
    x0 = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    def loss_from(stats, output):
        if terms == "means only":
            return sum(mean.square().sum() for mean, _ in stats.values())
        if terms == "variances only":
            return sum(var.sum() for _, var in stats.values())
        ce = nn.functional.cross_entropy(output.mean(dim=(2, 3)), labels)
        if terms == "output only":
            return ce
        gaps = [torch.sqrt(((stats[name][0] - model[int(name)].running_mean) ** 2).sum())
                + torch.sqrt(((stats[name][1] - model[int(name)].running_var) ** 2).sum()) for name in ("1", "4")]
        return ce + 0.1 * (10.0 * gaps[0] + gaps[1])

    x_manual = x0.clone().requires_grad_(True)
    inputs, handles = recorded_inputs(model)
    output = model(x_manual)
    for handle in handles:
        handle.remove()
    loss_from({name: manual_statistics(inputs[name]) for name in ("1", "4")}, output).backward()

    x_fused = x0.clone().requires_grad_(True)
    with BNStatisticsHook(model, fused=True) as hook:
        output = model(x_fused)
        loss_from(dict(hook.statistics), output).backward()

    scale = x_manual.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(x_fused.grad / scale, x_manual.grad / scale, rtol=0, atol=1e-5)


def test_fused_gradient_matches_separate_hook():
    model = create_model("resnet18", 10, 3, 16, 0.25).eval().requires_grad_(False)
    randomise_running_stats(model)
    x0 = torch.randn(8, 3, 16, 16)
    grads, losses = {}, {}
    for fused in (False, True):
        x = x0.clone().requires_grad_(True)
        with BNStatisticsHook(model, fused=fused) as hook:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, torch.arange(8)) + 0.01 * bn_matching_loss(hook)
            loss.backward()
        grads[fused], losses[fused] = x.grad, loss.detach()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=0)
    scale = grads[False].abs().max()
    torch.testing.assert_close(grads[True] / scale, grads[False] / scale, rtol=0, atol=1e-5)


def test_fused_hook_recomputes_scale_after_running_statistics_change():
    model = affine_tiny_model()
    x = torch.randn(4, 3, 8, 8)
    inputs, handles = recorded_inputs(model)
    with torch.no_grad(), BNStatisticsHook(model, fused=True):
        model(x)
        model[1].running_var.mul_(4.0)
        model[1].weight.add_(1.0)
        out = model[1](inputs["1"])
    torch.testing.assert_close(out, manual_eval_bn(model[1], inputs["1"]), rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()


def test_fused_hook_in_train_mode_behaves_like_batchnorm():
    model = affine_tiny_model()
    reference = copy.deepcopy(model).train()
    model.train()
    x = torch.randn(4, 3, 8, 8)
    inputs, handles = recorded_inputs(model)
    with torch.no_grad(), BNStatisticsHook(model, fused=True) as hook:
        out = model(x)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    mean, var = manual_statistics(inputs["1"])
    torch.testing.assert_close(hook.statistics["1"][1], var, rtol=1e-5, atol=1e-6)
    for handle in handles:
        handle.remove()


def test_fused_hook_remove_restores_batchnorm_forward():
    model = affine_tiny_model()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    hook = BNStatisticsHook(model, fused=True)
    assert "forward" in model[1].__dict__
    with pytest.raises(RuntimeError, match="already has a fused statistics hook"):
        BNStatisticsHook(model, fused=True)
    hook.remove()

    assert all("forward" not in module.__dict__ for module in model.modules())
    assert_no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert hook.statistics == {}


# --- bn_matching_loss ---------------------------------------------------------------------------


def test_loss_zero_when_batch_matches_running_stats():
    model = bn_first_model()
    x = torch.randn(8, 3, 6, 6) * 2.0 + 0.5

    with BNStatisticsHook(model) as hook:
        # Set each layer's running statistics in forward order: changing layer "0" changes
        # the input of layer "2", so layer "2" is captured again after layer "0" is set.
        for name in ("0", "2"):
            hook.clear()
            with torch.no_grad():
                model(x)
            mean, var = hook.statistics[name]
            model[int(name)].running_mean.copy_(mean)
            model[int(name)].running_var.copy_(var)

        hook.clear()
        with torch.no_grad():
            model(x)
        loss_norm = bn_matching_loss(hook, form="norm")
        loss_squared = bn_matching_loss(hook, form="squared")

    assert abs(loss_norm.item()) < 1e-5
    assert abs(loss_squared.item()) < 1e-5


def test_loss_zero_first_layer_exact_stats():
    """A lone BatchNorm2d whose running statistics are the batch's own mean and biased variance.

    float64 keeps the rounding gap between the hand sums and torch's reductions far below 1e-5.
    """
    model = nn.Sequential(nn.BatchNorm2d(3)).double().eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 3.0 - 1.0
    mean, var = manual_statistics(x)
    model[0].running_mean.copy_(mean)
    model[0].running_var.copy_(var)

    with BNStatisticsHook(model) as hook:
        model(x)
        loss = bn_matching_loss(hook)

    assert abs(loss.item()) < 1e-5


def test_loss_positive_when_stats_differ():
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    x = torch.randn(5, 3, 4, 4)
    mean, var = manual_statistics(x)
    model[0].running_mean.copy_(mean + 0.1)
    model[0].running_var.copy_(var)

    with BNStatisticsHook(model) as hook:
        model(x)
        loss = bn_matching_loss(hook, first_multiplier=1.0)

    # Only the mean is off, by 0.1 on each of 3 channels: the norm is 0.1 * sqrt(3).
    assert loss.item() > 0
    assert loss.item() == pytest.approx(0.1 * 3**0.5, rel=1e-4)


def layer_gaps(model: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return (mean gap, variance gap) vectors of the two BN layers of `tiny_model`, by hand."""
    with torch.no_grad():
        first_input = model[0](x)
        second_input = model[3](model[2](model[1](first_input)))
    gaps = []
    for layer, layer_input in ((model[1], first_input), (model[4], second_input)):
        mean, var = manual_statistics(layer_input)
        gaps.append((mean - layer.running_mean, var - layer.running_var))
    return gaps


@pytest.fixture
def model_and_gaps():
    model = tiny_model()
    randomise_running_stats(model)
    x = torch.randn(6, 3, 8, 8)
    hook = BNStatisticsHook(model)
    with torch.no_grad():
        model(x)
    yield hook, layer_gaps(model, x)
    hook.remove()


def test_loss_norm_form_by_hand(model_and_gaps):
    hook, gaps = model_and_gaps
    terms = [((dm**2).sum()).sqrt() + ((dv**2).sum()).sqrt() for dm, dv in gaps]

    loss = bn_matching_loss(hook, form="norm", reduction="sum", first_multiplier=1.0)

    assert loss.item() == pytest.approx(float(terms[0] + terms[1]), rel=1e-5)


def test_loss_squared_form_by_hand(model_and_gaps):
    hook, gaps = model_and_gaps
    terms = [(dm**2).sum() + (dv**2).sum() for dm, dv in gaps]

    loss = bn_matching_loss(hook, form="squared", reduction="sum", first_multiplier=1.0)

    assert loss.item() == pytest.approx(float(terms[0] + terms[1]), rel=1e-5)


def test_loss_first_multiplier_scales_first_layer(model_and_gaps):
    hook, gaps = model_and_gaps
    terms = [((dm**2).sum()).sqrt() + ((dv**2).sum()).sqrt() for dm, dv in gaps]

    loss = bn_matching_loss(hook, form="norm", reduction="sum", first_multiplier=10.0)

    assert loss.item() == pytest.approx(float(10.0 * terms[0] + terms[1]), rel=1e-5)


def test_loss_mean_reduction_divides_by_layers(model_and_gaps):
    hook, gaps = model_and_gaps
    terms = [(dm**2).sum() + (dv**2).sum() for dm, dv in gaps]

    loss = bn_matching_loss(hook, form="squared", reduction="mean", first_multiplier=3.0)

    assert loss.item() == pytest.approx(float((3.0 * terms[0] + terms[1]) / 2), rel=1e-5)


def test_loss_without_forward_raises():
    model = tiny_model()
    with BNStatisticsHook(model) as hook:
        with pytest.raises(RuntimeError, match="forward pass"):
            bn_matching_loss(hook)


def test_require_batchnorm_names_member():
    model = create_model("convnet_in", 10, 1, 8, 0.125)
    with pytest.raises(CvddError, match="'my-member'"):
        require_batchnorm(model, "my-member")
    require_batchnorm(tiny_model(), "tiny")


# --- batch_specific_bn (BSSL) -------------------------------------------------------------------


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_state_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"state dict entry {key!r} changed"


def test_bssl_normalises_with_batch_statistics():
    layer = nn.BatchNorm2d(3, eps=EPS)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        layer.running_mean.copy_(torch.tensor([5.0, -5.0, 3.0]))
        layer.running_var.copy_(torch.tensor([9.0, 0.25, 4.0]))
    layer.num_batches_tracked.fill_(7)
    layer.eval()
    x = torch.randn(4, 3, 5, 5) * 2.0 + 1.0
    mean, var = manual_statistics(x)
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
    expected = expected * layer.weight.detach().view(1, -1, 1, 1) + layer.bias.detach().view(1, -1, 1, 1)
    before = state_snapshot(layer)

    with batch_specific_bn(layer):
        with torch.no_grad():
            inside = layer(x)
    with torch.no_grad():
        outside = layer(x)

    assert torch.allclose(inside, expected, atol=1e-5)
    assert not torch.allclose(outside, expected, atol=1e-2), "eval mode outside the context should use running stats"
    assert not layer.training
    assert layer.track_running_stats
    assert_state_identical(layer, before)


def test_bssl_state_dict_bitwise_unchanged():
    model = tiny_model()
    randomise_running_stats(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(3)
    before = state_snapshot(model)

    with batch_specific_bn(model):
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(4, 3, 8, 8))

    assert_state_identical(model, before)
    assert all(not module.training for module in model.modules())


def test_bssl_keeps_train_mode():
    model = tiny_model().train()
    with batch_specific_bn(model):
        pass
    assert all(module.training for module in model.modules())
    assert model[1].track_running_stats
    assert model[4].track_running_stats


def test_bssl_restores_after_exception():
    model = tiny_model()
    before = state_snapshot(model)

    with pytest.raises(ValueError, match="inside the context"):
        with batch_specific_bn(model):
            raise ValueError("raised inside the context")

    assert not model[1].training
    assert not model[4].training
    assert model[1].track_running_stats
    assert model[4].track_running_stats
    assert_state_identical(model, before)


def test_bssl_resnet18_matches_train_mode():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, 16, 0.25).eval()
    randomise_running_stats(model, seed=5)
    x = torch.randn(4, 3, 16, 16)
    # Train mode normalises with batch statistics too; a copy keeps the original's buffers untouched.
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = reference(x)
        eval_output = model(x)
    before = state_snapshot(model)

    with batch_specific_bn(model):
        with torch.no_grad():
            inside = model(x)

    assert torch.allclose(inside, expected, atol=1e-5)
    assert not torch.allclose(inside, eval_output, atol=1e-3)
    assert_state_identical(model, before)
    assert all(not module.training for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), eval_output)
