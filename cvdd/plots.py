"""Matplotlib figures for notebooks and reports; each function returns a Figure.

The numbers come from `cvdd.analysis`, `cvdd.voting` and the run folder's result files.
"""

from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure

from .voting import prior_weights


def plot_weights_vs_temperature(priors: dict[str, float], temperatures: Sequence[float],
                                title: str = "voting weights softmax(alpha / T)") -> Figure:
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
    axes.set_title(title)
    axes.legend(fontsize="small", title="member (alpha %)", title_fontsize="small")
    figure.tight_layout()
    return figure


def plot_cosine_by_method(similarities: dict[str, dict[int, float]], class_names: Sequence[str],
                          title: str = "intra-class cosine similarity") -> Figure:
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
    axes.set_xlabel("class")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_bn_gap(gaps: dict, other: dict | None = None, title: str = "",
                labels: Sequence[str] = ("real", "distilled")) -> Figure:
    """Per-layer gap between batch and running BN statistics, one line per batch.

    Args:
        gaps: `cvdd.analysis.bn_statistics_gap` of one source of batches.
        other: the same for a second source (drawn in another colour), or None.
    """
    figure = Figure(figsize=(9, 3.4))
    sources = [(gaps, labels[0], "tab:blue")] + ([(other, labels[1], "tab:orange")] if other is not None else [])
    for position, key in enumerate(("mean_gap", "var_gap")):
        axes = figure.add_subplot(1, 2, position + 1)
        for values, label, colour in sources:
            for index, row in enumerate(values[key]):
                axes.plot(row.tolist(), alpha=0.6, color=colour, label=label if index == 0 else None)
        axes.set_xlabel("BatchNorm layer (input to output)")
        axes.set_ylabel("L2 distance of the " + ("mean" if key == "mean_gap" else "variance"))
        axes.set_yscale("log")
        axes.set_title("batch " + ("mean" if key == "mean_gap" else "variance") + " vs running", fontsize="medium")
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_embedding_statistics(with_bssl: dict, without_bssl: dict, title: str = "") -> Figure:
    """Mean and standard deviation of each BN layer's output, with and without BSSL."""
    figure = Figure(figsize=(9, 3.4))
    for position, key in enumerate(("mean", "std")):
        axes = figure.add_subplot(1, 2, position + 1)
        axes.plot(with_bssl[key].tolist(), marker=".", label="with BSSL")
        axes.plot(without_bssl[key].tolist(), marker=".", label="running statistics")
        axes.set_xlabel("BatchNorm layer (input to output)")
        axes.set_ylabel(f"output {key}")
        axes.set_title(f"BN output {'mean' if key == 'mean' else 'standard deviation'}", fontsize="medium")
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_tsne(points: torch.Tensor, labels: torch.Tensor, is_distilled: torch.Tensor,
              class_names: Sequence[str], title: str = "t-SNE: real (dots) and distilled (stars)") -> Figure:
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
    axes.set_xlabel("t-SNE 1")
    axes.set_ylabel("t-SNE 2")
    axes.set_title(title, fontsize="medium")
    axes.legend(fontsize="small", markerscale=2, title="class (stars: distilled)", title_fontsize="small")
    figure.tight_layout()
    return figure


def plot_student_curves(curves: dict[str, list[dict]], title: str = "student top-1 over epochs") -> Figure:
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
    axes.set_title(title, fontsize="medium")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def image_grid(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
               per_class: int | None = None, title: str = "") -> Figure:
    """Grid of images (N, C, H, W) in [0, 1]: one row per class, up to `per_class` columns."""
    classes = sorted(set(labels.tolist()))
    if not classes:
        figure = Figure(figsize=(3, 1))
        figure.text(0.5, 0.5, "no images yet", ha="center", va="center")
        return figure
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
    if title:
        figure.suptitle(title)
    return figure


def plot_synthesis_progress(history: dict) -> Figure:
    """Live synthesis curves: CE and BN term per expert, voting weights, intra-class cosine.

    Args:
        history: as kept by `cvdd.widgets.SynthesisMonitor`: {"ce": {expert: [(step, value)]},
            "bn": {...}, "weights": {...}, "cosine": [(step, value)]}; steps count iterations
            over all synthesis batches.
    """
    figure = Figure(figsize=(9, 5.2))
    panels = (("ce", "cross-entropy per expert"), ("bn", "BN-matching term per expert"),
              ("weights", "voting weight per expert"))
    for position, (key, title) in enumerate(panels):
        axes = figure.add_subplot(2, 2, position + 1)
        for expert, points in history.get(key, {}).items():
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=expert)
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("iteration (all batches)")
        if key == "bn" and any(p[1] > 0 for pts in history.get(key, {}).values() for p in pts):
            axes.set_yscale("log")
        if history.get(key):
            axes.legend(fontsize="x-small")
    axes = figure.add_subplot(2, 2, 4)
    cosine = history.get("cosine", [])
    if cosine:
        axes.plot([p[0] for p in cosine], [p[1] for p in cosine], marker=".", color="black")
    else:
        axes.text(0.5, 0.5, "needs two images of a class (IPC >= 2)", ha="center", va="center",
                  transform=axes.transAxes, fontsize="small")
    axes.set_title("intra-class cosine similarity (pixels)", fontsize="medium")
    axes.set_xlabel("iteration (all batches)")
    figure.tight_layout()
    return figure


def figure_png(figure: Figure, dpi: int = 80) -> bytes:
    """Render a Figure to PNG bytes without a GUI backend (for image widgets)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_member_accuracy(results: dict[str, dict]) -> Figure:
    """Test top-1 of each committee member, as returned by `pretrain_committee`."""
    names = list(results)
    values = [100 * results[n]["top1"] for n in names]
    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot()
    bars = axes.bar(names, values, color="tab:blue")
    axes.bar_label(bars, fmt="%.1f", fontsize="small")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title("committee members")
    axes.set_ylim(0, 100)
    axes.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    return figure


def show(figure: Figure, name: str | None = None, folder: str | None = None, dpi: int = 100) -> None:
    """Display a Figure in a notebook and, when `folder` is set, save it there as `name`.png.

    Reports pass `folder` (the report's figures/ folder) through the notebook parameters.
    """
    from pathlib import Path

    from IPython.display import Image, display

    data = figure_png(figure, dpi=dpi)
    if folder and name:
        from .runs import atomic_write_bytes

        atomic_write_bytes(Path(folder) / f"{name}.png", data)
    display(Image(data=data))


def plot_ablation(metrics: dict, label_mode: str = "soft", title: str = "") -> Figure:
    """Top-1 of each method per ablation variant, with the seed standard deviation as error bars."""
    rows = [r for r in metrics["results"] if r["label_mode"] == label_mode]
    variants = list(dict.fromkeys(r.get("variant", "") for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure = Figure(figsize=(max(5.0, 1.1 * len(variants) + 2), 3.4))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        found = {r.get("variant", ""): r for r in rows if r["method"] == method}
        positions = [v + index * width for v in range(len(variants)) if variants[v] in found]
        chosen = [found[name] for name in variants if name in found]
        axes.bar(positions, [100 * r["top1_mean"] for r in chosen], width,
                 yerr=[100 * r["top1_std"] for r in chosen], capsize=3, label=method)
    axes.set_xticks([v + 0.4 - width / 2 for v in range(len(variants))])
    axes.set_xticklabels(variants, rotation=20, ha="right")
    axes.set_xlabel("variant")
    axes.set_ylabel(f"test top-1 (%), {label_mode} labels")
    axes.set_title(title or f"ablation on {metrics['dataset']}, IPC {metrics['ipc']}", fontsize="medium")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
