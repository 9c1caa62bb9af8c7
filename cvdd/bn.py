"""BatchNorm machinery: statistic hooks, the BN-matching loss and the BSSL context.

References:
    [1] Yin et al., "Squeeze, Recover and Relabel" (SRe2L), 2023: BN-statistic matching.
    [2] Cui et al., "Dataset Distillation via Committee Voting", Eq. 6-10 and Section 3.5:
        the squared BN loss and Batch-Specific Soft Labeling (BSSL).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .errors import CvddError

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Return every BatchNorm layer of `model` by module path, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BN input.

    Args:
        x: (N, C) or (N, C, *spatial) tensor.

    Returns:
        (mean, var), each shape (C,), reduced over every dimension except 1, in at least
        float32, differentiable with respect to `x`.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return _ChannelStatistics.apply(x)


def _statistics_gradient(mean, grad_mean, grad_var, count: int, shape: list[int]):
    """Return (offset, slope) with which the input gradient of the mean and variance is offset + slope * x."""
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    offset = ((grad_mean - 2.0 * mean * grad_var) / count).view(shape)
    slope = (2.0 * grad_var / count).view(shape)
    return offset, slope


class _ChannelStatistics(torch.autograd.Function):
    """Mean and biased variance per channel, from the sums of x and x^2, with a one-pass backward.

    Tensor.mean and Tensor.var and their autograd backward walk the whole input four to six
    times; here the forward is two reductions and the backward one fused multiply-add,
    dx = (g_mean - 2 mean g_var) / n + (2 g_var / n) x. BN inputs are of order one, so the
    cancellation in E[x^2] - E[x]^2 stays near float32 rounding (about 1e-6).
    """

    @staticmethod
    def forward(ctx, x):
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        mean = x.sum(dim=dims) / count
        var = ((x * x).sum(dim=dims) / count - mean * mean).clamp(min=0.0)
        ctx.save_for_backward(x, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        offset, slope = _statistics_gradient(mean, grad_mean, grad_var, ctx.count, shape)
        return torch.addcmul(offset, slope, x)


def _eval_scale(module: _BatchNorm) -> torch.Tensor:
    """Return the per-channel factor by which an eval-mode BatchNorm multiplies its input."""
    scale = torch.rsqrt(module.running_var + module.eps)
    return (scale if module.weight is None else scale * module.weight).detach()


class _StatisticsBatchNorm(torch.autograd.Function):
    """Eval-mode BatchNorm that also returns the per-channel mean and variance of its input.

    The output is the BatchNorm kernel's own. The statistics are reduced over the contiguous
    last dimension first (a row sum and a row norm per sample and channel, then a sum over
    the batch), which reads the input twice and makes no temporary x * x. The backward
    returns the input gradient of all three outputs in three elementwise passes,
    dx = scale * dy + slope * x + offset, where BatchNorm's own backward, the separate
    statistics backward and autograd's sum of the two take four and cost more.
    """

    @staticmethod
    def forward(ctx, x, scale, weight, bias, running_mean, running_var, eps):
        ctx.set_materialize_grads(False)
        rows = x.view(x.shape[0], x.shape[1], -1)
        count = rows.shape[0] * rows.shape[2]
        mean = rows.sum(dim=2).sum(dim=0) / count
        mean_square = torch.linalg.vector_norm(rows, dim=2).square().sum(dim=0) / count
        var = (mean_square - mean * mean).clamp(min=0.0)
        ctx.save_for_backward(x, scale, mean)
        ctx.count = count
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        x, scale, mean = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        none = (None,) * 6
        if grad_mean is None and grad_var is None:
            return (None if grad_y is None else grad_y * scale.view(shape)), *none
        offset, slope = _statistics_gradient(mean, grad_mean, grad_var, ctx.count, shape)
        if grad_y is None:
            return torch.addcmul(offset, slope, x), *none
        return (grad_y * scale.view(shape)).addcmul_(x, slope).add_(offset), *none


class BNStatisticsHook:
    """Captures the input mean and variance of every BatchNorm layer on each forward pass.

    Hooks are attached by module path with forward pre-hooks, so no model code changes.
    After a forward pass, `statistics[path]` is (mean, var) of that layer's input, both
    shape (C,) and differentiable with respect to the input. Use as a context manager or
    call :meth:`remove`.

    With `fused=True` each layer's forward is replaced instead, until :meth:`remove`: in eval
    mode on a contiguous float32 input it returns the statistics from the same call as its
    output (`_StatisticsBatchNorm`), which costs less than a pre-hook, whose statistics and
    their backward come on top of BatchNorm's own. Otherwise it falls back to the pre-hook's
    arithmetic. The statistics then differ from the pre-hook's at float rounding. Deep-copy
    the model before attaching a fused hook, not after: a copy would carry the replaced
    forward, bound to the original layers.
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None, fused: bool = False):
        self.layers = batchnorm_layers(model)
        if layers is not None:
            self.layers = {name: self.layers[name] for name in layers}
        self.statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fused = fused
        if fused:
            self._handles = []
            hooked = [name for name, module in self.layers.items() if "forward" in module.__dict__]
            if hooked:
                raise RuntimeError(f"BatchNorm layer {hooked[0]!r} already has a fused statistics hook; "
                                   "remove that hook first or attach this one to a copy of the model")
            for name, module in self.layers.items():
                module.forward = self._make_forward(name, module)
        else:
            self._handles = [
                module.register_forward_pre_hook(self._make_hook(name)) for name, module in self.layers.items()
            ]

    def _make_hook(self, name: str):
        def hook(module, inputs):
            self.statistics[name] = input_statistics(inputs[0])

        return hook

    def _make_forward(self, name: str, module: _BatchNorm):
        layer_forward = type(module).forward
        cached = {}

        def forward(x):
            if (module.training or module.running_mean is None or x.dim() < 2 or x.dtype != torch.float32
                    or not x.is_contiguous()):
                self.statistics[name] = input_statistics(x)
                return layer_forward(module, x)
            # The scale is recomputed only when the running variance or the weight has changed
            # (their version counters move on every in-place update, load_state_dict included).
            versions = (module.running_var._version, None if module.weight is None else module.weight._version)
            if cached.get("versions") != versions:
                cached["versions"], cached["scale"] = versions, _eval_scale(module)
            y, mean, var = _StatisticsBatchNorm.apply(x, cached["scale"], module.weight, module.bias,
                                                      module.running_mean, module.running_var, module.eps)
            self.statistics[name] = (mean, var)
            return y

        return forward

    def clear(self) -> None:
        # Empty the dict in place. torch.compile guards on its identity and emptiness, so a new
        # dict, or a forward pass that finds it filled, would compile the model a second time.
        self.statistics.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.fused:
            for module in self.layers.values():
                module.__dict__.pop("forward", None)
            self.fused = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def bn_matching_loss(
    hook: BNStatisticsHook,
    form: Literal["norm", "squared"] = "norm",
    reduction: Literal["sum", "mean"] = "sum",
    first_multiplier: float = 10.0,
) -> torch.Tensor:
    """Distance between the captured batch statistics and each layer's running statistics.

    Per layer l: `||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2` in the norm form
    (the public SRe2L and CV-DD code), or the same with squared norms (Eq. 10 of [2]).
    The first BatchNorm layer is weighted by `first_multiplier`. The layer terms are summed
    (`reduction="sum"`, which grows with depth) or averaged over the layers.

    Returns:
        scalar tensor, differentiable with respect to the input of the forward pass.
    """
    if not hook.statistics:
        raise RuntimeError("no BatchNorm statistics captured; run a forward pass inside the hook first")
    terms = []
    for index, (name, module) in enumerate(hook.layers.items()):
        if name not in hook.statistics:
            continue
        mean, var = hook.statistics[name]
        mean_gap = torch.linalg.vector_norm(mean - module.running_mean.to(mean.dtype))
        var_gap = torch.linalg.vector_norm(var - module.running_var.to(var.dtype))
        term = mean_gap**2 + var_gap**2 if form == "squared" else mean_gap + var_gap
        terms.append(term * (first_multiplier if index == 0 else 1.0))
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def require_batchnorm(model: nn.Module, name: str) -> None:
    """Raise CvddError if BN matching is requested on a model without BatchNorm layers."""
    if not batchnorm_layers(model):
        raise CvddError(
            f"committee member {name!r} has no BatchNorm layers, so BN matching cannot use it; "
            "choose a member with BatchNorm or set synthesis.r_bn=0"
        )


@contextmanager
def batch_specific_bn(model: nn.Module):
    """Batch-Specific Soft Labeling (BSSL) context.

    Inside the context every BatchNorm layer of `model` normalises with the current
    batch's own mean and biased variance (Eq. 6-7 of [2]) instead of its running
    statistics; everything else keeps its current mode. No running statistic, counter
    or parameter changes, so the state dict afterwards is bitwise what it was before.

    NOTE: a layer whose input has one value per channel (batch of 1 at 1x1 spatial size)
    cannot compute batch statistics and raises, as BatchNorm does in training mode.
    """
    layers = list(batchnorm_layers(model).values())
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            # training=True with track_running_stats=False makes F.batch_norm use batch
            # statistics and receive no running buffers to update.
            m.training = True
            m.track_running_stats = False
        yield model
    finally:
        for m, (training, track) in zip(layers, saved):
            m.training = training
            m.track_running_stats = track
