"""Numbers behind the analysis figures: diversity, BN statistics and embeddings.

Each function returns plain tensors or dicts; `cvdd.plots` draws them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .bn import BNStatisticsHook, batch_specific_bn, batchnorm_layers


def intra_class_cosine(vectors: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Mean pairwise cosine similarity between the vectors of each class.

    Args:
        vectors: (N, D) features, or images (N, C, H, W) which are flattened.
        labels: (N,) class indices.

    Returns:
        {class: mean cosine similarity over distinct pairs}; classes with one vector are left out.
        Lower values mean a more diverse distilled set.
    """
    flat = F.normalize(vectors.reshape(len(vectors), -1).double(), dim=1)
    result = {}
    for label in torch.unique(labels).tolist():
        rows = flat[labels == label]
        count = len(rows)
        if count < 2:
            continue
        similarity = rows @ rows.T  # (n, n), ones on the diagonal
        off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1))
        result[int(label)] = float(off_diagonal)
    return result


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features before the classifier, shape (N, D), for normalised images (N, C, H, W).

    Uses the model's `features` method where it has one (the registry's ResNet and ConvNet),
    and otherwise the input of its last Linear layer.
    """
    model.eval()
    outputs = []
    if hasattr(model, "features") and callable(model.features):
        for start in range(0, len(images), batch_size):
            outputs.append(model.features(images[start:start + batch_size]).flatten(1))
        return torch.cat(outputs)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured = []
    handle = last_linear.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].flatten(1)))
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def bn_statistics_gap(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Distance of each batch's BN input statistics from the running statistics, per layer.

    Args:
        model: a model with BatchNorm layers, used in eval mode.
        batches: normalised image batches (B, C, H, W).

    Returns:
        {"layers": list of module paths, "mean_gap": (num_batches, num_layers),
        "var_gap": (num_batches, num_layers)}, each gap the L2 norm of the difference.
    """
    model.eval()
    layers = batchnorm_layers(model)
    mean_gaps, var_gaps = [], []
    with BNStatisticsHook(model) as hook:
        for batch in batches:
            hook.clear()
            model(batch)
            mean_row, var_row = [], []
            for name, module in layers.items():
                mean, var = hook.statistics[name]
                mean_row.append(torch.linalg.vector_norm(mean - module.running_mean))
                var_row.append(torch.linalg.vector_norm(var - module.running_var))
            mean_gaps.append(torch.stack(mean_row))
            var_gaps.append(torch.stack(var_row))
    return {"layers": list(layers), "mean_gap": torch.stack(mean_gaps), "var_gap": torch.stack(var_gaps)}


@torch.no_grad()
def embedding_statistics(model: nn.Module, batch: torch.Tensor, bssl: bool) -> dict[str, torch.Tensor]:
    """Mean and standard deviation of each BN layer's output on one batch, with or without BSSL.

    With running statistics, outputs of a batch unlike the training data drift away from
    zero mean and unit spread; BSSL normalises with the batch's own statistics.

    Returns:
        {"layers": module paths, "mean": (num_layers,), "std": (num_layers,)} over all output values.
    """
    model.eval()
    layers = batchnorm_layers(model)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach()))
        for name, module in layers.items()
    ]
    context = batch_specific_bn(model) if bssl else contextlib.nullcontext()
    try:
        with context:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    names = list(layers)
    return {
        "layers": names,
        "mean": torch.stack([outputs[n].mean() for n in names]),
        "std": torch.stack([outputs[n].std() for n in names]),
    }


def tsne_embedding(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """Two-dimensional t-SNE (scikit-learn) of (N, D) features, shape (N, 2).

    The perplexity is lowered to N - 1 for small sets, which scikit-learn requires.
    """
    from sklearn.manifold import TSNE

    count = len(features)
    if count < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {count}")
    perplexity = min(perplexity, count - 1.0)
    points = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        features.double().cpu().numpy()
    )
    return torch.from_numpy(points)
