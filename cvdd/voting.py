"""Committee voting: prior weights, expert draws, voter strategies and soft-label aggregation.

The prior-guided weights are w_i = softmax(alpha_i / T) (Eq. 4 and Algorithm 3 of Cui et
al., "Dataset Distillation via Committee Voting"), with alpha_i the prior performance of
member i in percent and T the temperature.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError

VOTERS = ("prior", "equal", "random")


def prior_weights(priors: Sequence[float] | torch.Tensor, temperature: float) -> torch.Tensor:
    """Return softmax(priors / temperature), shape (M,), summing to 1.

    Raises:
        ConfigError: if the temperature is 0 or less.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature T={temperature} is invalid; use a value greater than 0, such as 5")
    alpha = torch.as_tensor(priors, dtype=torch.float64)
    return torch.softmax(alpha / temperature, dim=0).float()


def draw_experts(num_members: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Draw `experts` distinct member indices out of `num_members`, in draw order.

    Raises:
        ConfigError: if `experts` is below 1 or above `num_members`.
    """
    if not 1 <= experts <= num_members:
        raise ConfigError(
            f"number of experts N={experts} is invalid for a committee of {num_members}; "
            f"use 1 <= N <= {num_members}"
        )
    return torch.randperm(num_members, generator=generator)[:experts]


def voter_weights(
    strategy: Literal["prior", "equal", "random"], priors: Sequence[float], temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Weights of the drawn experts under a voter strategy, shape (N,), summing to 1.

    `prior` gives softmax(alpha / T); `equal` gives 1/N each; `random` gives uniform random
    weights normalised to sum to 1 (drawn from `generator`).
    """
    n = len(priors)
    if strategy == "prior":
        return prior_weights(priors, temperature)
    if strategy == "equal":
        return torch.full((n,), 1.0 / n)
    if strategy == "random":
        raw = torch.rand(n, generator=generator) + 1e-6
        return raw / raw.sum()
    raise ConfigError(f"voter strategy {strategy!r} is unknown; choose one of {', '.join(VOTERS)}")


def online_reweighting(weights: torch.Tensor, iteration: int, total: int) -> torch.Tensor:
    """Move linearly from equal weights at iteration 0 to `weights` at the last iteration."""
    progress = iteration / max(1, total - 1)
    equal = torch.full_like(weights, 1.0 / len(weights))
    return (1.0 - progress) * equal + progress * weights


def strongest_expert(priors: Sequence[float]) -> int:
    """Index of the expert with the highest prior (the first one on ties)."""
    return int(torch.as_tensor(priors).argmax())


def aggregate_soft_labels(
    logits: Sequence[torch.Tensor], weights: torch.Tensor, tau: float = 1.0,
    space: Literal["prob", "logit"] = "prob",
) -> torch.Tensor:
    """Combine the committee's logits into one target distribution per sample.

    Args:
        logits: one (B, K) tensor per member.
        weights: (M,) member weights summing to 1.
        tau: softmax temperature of the distillation loss.
        space: `prob` mixes the class probabilities, sum_i w_i softmax(z_i / tau)
            (Algorithm 3); `logit` takes softmax(sum_i w_i z_i / tau), the variant of the
            method's public code.

    Returns:
        (B, K) probabilities, each row summing to 1.
    """
    stacked = torch.stack([z.float() for z in logits])  # (M, B, K)
    w = weights.to(stacked.device, stacked.dtype).view(-1, 1, 1)
    if space == "logit":
        return F.softmax((w * stacked).sum(dim=0) / tau, dim=-1)
    return (w * F.softmax(stacked / tau, dim=-1)).sum(dim=0)
