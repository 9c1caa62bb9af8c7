"""Matplotlib figures for notebooks and reports; each function returns a Figure.

The numbers come from `cvdd.analysis`, `cvdd.voting` and the run folder's result files.
"""

from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure

from .voting import prior_weights


def plot_weights_vs_temperature(priors: dict[str, float], temperatures: Sequence[float]) -> Figure:
    """Voting weights softmax(alpha / T) of every member against T (log scale)."""
    names = list(priors)
    weights = torch.stack([prior_weights([priors[n] for n in names], t) for t in temperatures])  # (T, M)
    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot()
    for index, name in enumerate(names):
        axes.plot(list(temperatures), weights[:, index].tolist(), marker="o", label=f"{name} ({priors[name]:.1f})")
    axes.set_xscale("log")
    axes.set_xlabel("temperature T")
    axes.set_ylabel("weight")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_cosine_by_method(similarities: dict[str, dict[int, float]], class_names: Sequence[str]) -> Figure:
    """Intra-class cosine similarity per class, one bar group per class and one bar per method."""
    methods = list(similarities)
    classes = sorted({c for values in similarities.values() for c in values})
    figure = Figure(figsize=(max(5, 0.6 * len(classes)), 3.2))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        positions = [c + index * width for c in range(len(classes))]
        axes.bar(positions, [similarities[method].get(c, float("nan")) for c in classes], width, label=method)
    axes.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))])
    axes.set_xticklabels([class_names[c] for c in classes], rotation=45, ha="right")
    axes.set_ylabel("mean cosine similarity")
    axes.legend()
    figure.tight_layout()
    return figure


def plot_bn_gap(gaps: dict, title: str = "") -> Figure:
    """Per-layer gap between batch and running BN statistics, one line per batch (mean and variance)."""
    figure = Figure(figsize=(8, 3.2))
    for position, key in enumerate(("mean_gap", "var_gap")):
        axes = figure.add_subplot(1, 2, position + 1)
        for row in gaps[key]:
            axes.plot(row.tolist(), alpha=0.6)
        axes.set_xlabel("BatchNorm layer")
        axes.set_ylabel("L2 distance of the " + ("mean" if key == "mean_gap" else "variance"))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_embedding_statistics(with_bssl: dict, without_bssl: dict) -> Figure:
    """Mean and standard deviation of each BN layer's output, with and without BSSL."""
    figure = Figure(figsize=(8, 3.2))
    for position, key in enumerate(("mean", "std")):
        axes = figure.add_subplot(1, 2, position + 1)
        axes.plot(with_bssl[key].tolist(), label="with BSSL")
        axes.plot(without_bssl[key].tolist(), label="running statistics")
        axes.set_xlabel("BatchNorm layer")
        axes.set_ylabel(f"output {key}")
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_tsne(points: torch.Tensor, labels: torch.Tensor, is_distilled: torch.Tensor,
              class_names: Sequence[str]) -> Figure:
    """t-SNE points coloured by class; real images as dots and distilled images as stars."""
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    for label in torch.unique(labels).tolist():
        real = (labels == label) & ~is_distilled
        distilled = (labels == label) & is_distilled
        line = axes.scatter(points[real, 0], points[real, 1], s=8, alpha=0.4, label=class_names[label])
        axes.scatter(points[distilled, 0], points[distilled, 1], s=90, marker="*", edgecolors="black",
                     color=line.get_facecolor()[0])
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize="small", markerscale=2)
    figure.tight_layout()
    return figure


def plot_student_curves(curves: dict[str, list[dict]]) -> Figure:
    """Student train top-1 (every epoch) and test top-1 (where measured) against the epoch, per method."""
    figure = Figure(figsize=(5.5, 3.5))
    axes = figure.add_subplot()
    for method, curve in curves.items():
        line = axes.plot([r["epoch"] for r in curve], [r["train_top1"] for r in curve], alpha=0.5,
                         label=f"{method} train")[0]
        tested = [r for r in curve if "test_top1" in r]
        axes.plot([r["epoch"] for r in tested], [r["test_top1"] for r in tested], marker="o",
                  color=line.get_color(), label=f"{method} test")
    axes.set_xlabel("epoch")
    axes.set_ylabel("top-1")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def image_grid(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
               per_class: int | None = None) -> Figure:
    """Grid of images (N, C, H, W) in [0, 1]: one row per class, up to `per_class` columns."""
    classes = sorted(set(labels.tolist()))
    columns = per_class or max(int((labels == c).sum()) for c in classes)
    figure = Figure(figsize=(columns * 0.9 + 1.2, len(classes) * 0.9))
    for row, label in enumerate(classes):
        chosen = images[labels == label][:columns]
        for column, image in enumerate(chosen):
            axes = figure.add_subplot(len(classes), columns, row * columns + column + 1)
            array = image.permute(1, 2, 0).clamp(0, 1).numpy()
            axes.imshow(array[:, :, 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None,
                        vmin=0, vmax=1)
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(class_names[label], rotation=0, ha="right", va="center", fontsize="small")
    return figure
