import torch

from cvdd import plots


def test_weights_vs_temperature_lines_sum_to_one():
    priors = {"resnet18": 75.41, "resnet50": 70.59, "shufflenet_v2": 52.63}
    figure = plots.plot_weights_vs_temperature(priors, [1, 5, 20])
    lines = figure.axes[0].get_lines()
    assert len(lines) == 3
    for index in range(3):
        total = sum(line.get_ydata()[index] for line in lines)
        assert abs(total - 1.0) < 1e-6


def test_cosine_by_method_bars():
    figure = plots.plot_cosine_by_method({"sre2l++": {0: 0.5, 1: 0.4}, "cvdd": {0: 0.3, 1: 0.2}}, ["a", "b"])
    heights = sorted(round(p.get_height(), 3) for p in figure.axes[0].patches)
    assert heights == [0.2, 0.3, 0.4, 0.5]


def test_bn_gap_and_embedding_figures():
    gaps = {"layers": ["a", "b", "c"], "mean_gap": torch.rand(4, 3), "var_gap": torch.rand(4, 3)}
    figure = plots.plot_bn_gap(gaps, title="title")
    assert len(figure.axes) == 2
    assert len(figure.axes[0].get_lines()) == 4
    other = {"layers": ["a", "b", "c"], "mean_gap": torch.rand(2, 3), "var_gap": torch.rand(2, 3)}
    figure = plots.plot_bn_gap(gaps, other)
    colours = [line.get_color() for line in figure.axes[0].get_lines()]
    assert colours.count("tab:blue") == 4
    assert colours.count("tab:orange") == 2
    stats = {"layers": ["a", "b"], "mean": torch.zeros(2), "std": torch.ones(2)}
    figure = plots.plot_embedding_statistics(stats, stats)
    assert len(figure.axes[1].get_lines()) == 2


def test_tsne_and_curves_and_grid():
    points = torch.randn(6, 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    distilled = torch.tensor([False, False, True, False, False, True])
    figure = plots.plot_tsne(points, labels, distilled, ["a", "b"])
    assert len(figure.axes[0].collections) == 4

    curve = [{"epoch": 1, "train_top1": 0.2}, {"epoch": 2, "train_top1": 0.4, "test_top1": 0.3}]
    figure = plots.plot_student_curves({"cvdd": curve})
    test_line = figure.axes[0].get_lines()[1]
    assert list(test_line.get_ydata()) == [0.3]

    images = torch.rand(6, 1, 8, 8)
    figure = plots.image_grid(images, labels, ["a", "b"])
    assert len(figure.axes) == 6
