import math

import pytest
import torch
from torch import nn

from cvdd.analysis import bn_statistics_gap, embedding_statistics, intra_class_cosine, tsne_embedding


def test_intra_class_cosine_hand_values():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    result = intra_class_cosine(vectors, labels)
    # Class 0 pairs: (e1, e2) = 0, (e1, d) = 1/sqrt(2), (e2, d) = 1/sqrt(2).
    assert result[0] == pytest.approx(2 / math.sqrt(2) / 3)
    assert result[1] == pytest.approx(1.0)


def test_intra_class_cosine_skips_singletons():
    result = intra_class_cosine(torch.randn(3, 4), torch.tensor([0, 0, 1]))
    assert set(result) == {0}


def test_intra_class_cosine_flattens_images():
    images = torch.rand(4, 1, 2, 2)
    labels = torch.tensor([0, 0, 0, 0])
    assert intra_class_cosine(images, labels) == intra_class_cosine(images.reshape(4, -1), labels)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()


def test_bn_gap_zero_at_running_statistics():
    model = bn_model()
    batch = torch.randn(8, 2, 4, 4) * 2 + 1
    model[0].running_mean.copy_(batch.mean(dim=(0, 2, 3)))
    model[0].running_var.copy_(batch.var(dim=(0, 2, 3), unbiased=False))
    gaps = bn_statistics_gap(model, [batch, batch + 1])
    assert gaps["layers"] == ["0", "2"]
    assert gaps["mean_gap"].shape == (2, 2)
    assert gaps["mean_gap"][0, 0].item() == pytest.approx(0.0, abs=1e-5)
    assert gaps["var_gap"][0, 0].item() == pytest.approx(0.0, abs=1e-5)
    # Shifting every value by 1 moves each channel mean by 1: the gap is sqrt(2) over 2 channels.
    assert gaps["mean_gap"][1, 0].item() == pytest.approx(math.sqrt(2), abs=1e-4)


def test_embedding_statistics_bssl_normalises():
    model = bn_model()
    batch = torch.randn(16, 2, 4, 4) * 5 + 3
    with_bssl = embedding_statistics(model, batch, bssl=True)
    without = embedding_statistics(model, batch, bssl=False)
    # Fresh BN layers have weight 1 and bias 0, so batch statistics give mean 0 and std 1.
    assert with_bssl["mean"][0].item() == pytest.approx(0.0, abs=1e-4)
    assert with_bssl["std"][0].item() == pytest.approx(1.0, abs=1e-2)
    # Running statistics are mean 0, variance 1, so the raw shift of 3 remains.
    assert without["mean"][0].item() == pytest.approx(batch.mean().item(), abs=1e-3)


def test_embedding_statistics_leaves_model_unchanged():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embedding_statistics(model, torch.randn(4, 2, 4, 4), bssl=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training


def test_tsne_embedding_shape_and_seed():
    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    first = tsne_embedding(features, seed=1)
    second = tsne_embedding(features, seed=1)
    assert first.shape == (12, 2)
    assert torch.allclose(first, second)


def test_tsne_embedding_rejects_two_points():
    with pytest.raises(ValueError, match="at least 3"):
        tsne_embedding(torch.randn(2, 3))
