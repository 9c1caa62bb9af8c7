"""Tests of cvdd.voting: prior weights, expert draws, voter strategies and soft-label aggregation.

Expected weights and distributions are computed in the test with math.exp or written out
by hand, never with the functions under test.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from cvdd.errors import ConfigError
from cvdd.voting import (
    aggregate_soft_labels,
    draw_experts,
    online_reweighting,
    prior_weights,
    strongest_expert,
    voter_weights,
)

PRIORS = [75.41, 70.59, 75.46, 52.63, 71.37]


def softmax_by_hand(values: list[float], temperature: float) -> list[float]:
    exponentials = [math.exp(v / temperature) for v in values]
    total = sum(exponentials)
    return [e / total for e in exponentials]


# --- prior_weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 20.0])
def test_prior_weights_sum_to_one(temperature):
    weights = prior_weights(PRIORS, temperature)
    assert weights.shape == (5,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (weights >= 0).all()


def test_prior_weights_match_hand_softmax():
    expected = softmax_by_hand(PRIORS, 5.0)

    weights = prior_weights(PRIORS, 5.0)

    assert weights.tolist() == pytest.approx(expected, abs=1e-6)
    # The same values rounded by hand: exp(alpha / 5) normalised, largest prior (75.46) first.
    assert weights.tolist() == pytest.approx([0.351165, 0.133922, 0.354694, 0.003689, 0.156531], abs=2e-6)


def test_prior_weights_large_temperature_equal():
    weights = prior_weights(PRIORS, 1e6)
    assert weights.tolist() == pytest.approx([0.2] * 5, abs=1e-3)


def test_prior_weights_small_temperature_one_hot():
    weights = prior_weights(PRIORS, 1e-3)
    assert weights.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0], abs=1e-6)


def test_prior_weights_accept_tensor():
    weights = prior_weights(torch.tensor(PRIORS), 5.0)
    assert weights.tolist() == pytest.approx(softmax_by_hand(PRIORS, 5.0), abs=1e-6)


@pytest.mark.parametrize("temperature", [0, 0.0, -1, -0.5, float("nan")])
def test_prior_weights_invalid_temperature(temperature):
    with pytest.raises(ConfigError, match="temperature"):
        prior_weights(PRIORS, temperature)


def test_strongest_expert_first_on_ties():
    assert strongest_expert(PRIORS) == 2
    assert strongest_expert([60.0, 70.0, 70.0]) == 1


# --- draw_experts -------------------------------------------------------------------------------


def test_draw_experts_seeded():
    first = draw_experts(5, 3, torch.Generator().manual_seed(11))
    second = draw_experts(5, 3, torch.Generator().manual_seed(11))
    assert torch.equal(first, second)


def test_draw_experts_distinct_in_range():
    generator = torch.Generator().manual_seed(0)
    for experts in range(1, 6):
        for _ in range(20):
            drawn = draw_experts(5, experts, generator).tolist()
            assert len(drawn) == experts
            assert len(set(drawn)) == experts, f"repeated member in draw {drawn}"
            assert all(0 <= index < 5 for index in drawn), drawn


def test_draw_experts_covers_every_member():
    generator = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(200):
        counts.update(draw_experts(5, 2, generator).tolist())

    assert set(counts) == {0, 1, 2, 3, 4}
    # 400 picks spread over 5 members: each expects 80, and below 40 would be far outside chance.
    assert min(counts.values()) > 40, counts


def test_draw_experts_seeds_differ():
    draws = {tuple(draw_experts(5, 2, torch.Generator().manual_seed(seed)).tolist()) for seed in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("experts", [0, 6, -1])
def test_draw_experts_invalid_count(experts):
    with pytest.raises(ConfigError, match=f"N={experts}"):
        draw_experts(5, experts, torch.Generator().manual_seed(0))


# --- voter_weights ------------------------------------------------------------------------------


def test_voter_weights_equal():
    weights = voter_weights("equal", PRIORS[:4], 5.0)
    assert weights.tolist() == pytest.approx([0.25] * 4)


def test_voter_weights_random_seeded():
    first = voter_weights("random", PRIORS, 5.0, torch.Generator().manual_seed(3))
    second = voter_weights("random", PRIORS, 5.0, torch.Generator().manual_seed(3))
    other = voter_weights("random", PRIORS, 5.0, torch.Generator().manual_seed(4))

    assert first.shape == (5,)
    assert float(first.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (first > 0).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_voter_weights_prior():
    chosen = [PRIORS[1], PRIORS[3]]
    weights = voter_weights("prior", chosen, 5.0)
    assert weights.tolist() == pytest.approx(softmax_by_hand(chosen, 5.0), abs=1e-6)


def test_voter_weights_unknown_strategy():
    with pytest.raises(ConfigError, match="'loudest'"):
        voter_weights("loudest", PRIORS, 5.0)


# --- online_reweighting -------------------------------------------------------------------------


def test_online_reweighting_endpoints_and_middle():
    weights = torch.tensor([0.7, 0.2, 0.1])
    total = 11

    start = online_reweighting(weights, 0, total)
    middle = online_reweighting(weights, 5, total)
    end = online_reweighting(weights, total - 1, total)

    assert start.tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert end.tolist() == pytest.approx([0.7, 0.2, 0.1], abs=1e-6)
    # Halfway: the mean of 1/3 and each weight.
    assert middle.tolist() == pytest.approx([(1 / 3 + 0.7) / 2, (1 / 3 + 0.2) / 2, (1 / 3 + 0.1) / 2], abs=1e-6)
    assert float(middle.sum()) == pytest.approx(1.0, abs=1e-6)


def test_online_reweighting_linear_steps():
    weights = torch.tensor([1.0, 0.0])
    total = 5
    # The first weight moves from 0.5 to 1.0 in four equal steps of 0.125.
    firsts = [float(online_reweighting(weights, i, total)[0]) for i in range(total)]
    assert firsts == pytest.approx([0.5, 0.625, 0.75, 0.875, 1.0], abs=1e-6)


# --- aggregate_soft_labels ----------------------------------------------------------------------


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    shifted = z - z.max(dim=1, keepdim=True).values
    exponentials = shifted.exp()
    return exponentials / exponentials.sum(dim=1, keepdim=True)


@pytest.fixture
def committee_logits():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 6, generator=generator) * 3 for _ in range(3)]


@pytest.mark.parametrize("tau", [1.0, 4.0, 20.0])
def test_aggregate_prob_space_by_hand(committee_logits, tau):
    weights = torch.tensor([0.5, 0.3, 0.2])
    expected = sum(w * softmax_rows(z / tau) for w, z in zip(weights.tolist(), committee_logits))

    targets = aggregate_soft_labels(committee_logits, weights, tau=tau, space="prob")

    assert targets.shape == (4, 6)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0, 20.0])
def test_aggregate_logit_space_by_hand(committee_logits, tau):
    weights = torch.tensor([0.5, 0.3, 0.2])
    mixed_logits = sum(w * z for w, z in zip(weights.tolist(), committee_logits))
    expected = softmax_rows(mixed_logits / tau)

    targets = aggregate_soft_labels(committee_logits, weights, tau=tau, space="logit")

    assert torch.allclose(targets, expected, atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4), atol=1e-6)


def test_aggregate_spaces_differ(committee_logits):
    weights = torch.tensor([0.5, 0.3, 0.2])
    prob = aggregate_soft_labels(committee_logits, weights, tau=1.0, space="prob")
    logit = aggregate_soft_labels(committee_logits, weights, tau=1.0, space="logit")
    assert not torch.allclose(prob, logit, atol=1e-3)


def test_aggregate_single_member_is_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    # exp(1, 2, 3) / (e + e^2 + e^3) = 0.090031, 0.244728, 0.665241.
    targets = aggregate_soft_labels([logits], torch.ones(1), tau=1.0)
    assert targets[0].tolist() == pytest.approx([0.090031, 0.244728, 0.665241], abs=1e-6)
