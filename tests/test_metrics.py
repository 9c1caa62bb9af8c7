import math
import statistics

import pytest

from cvdd.errors import ConfigError, CvddError
from cvdd.metrics import (
    alpha_score,
    fair_metrics,
    fair_rows,
    format_fair_table,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    seed_statistics,
)

E = math.e


def lrs_by_hand(alpha):
    return (math.exp(alpha) - 1 / E) / (E - 1 / E)


# Three seeds used by the fair_metrics and fair_rows tests.
SYN_SOFT = [0.60, 0.62, 0.64]
SYN_HARD = [0.30, 0.33, 0.36]
RANDOM_SOFT = [0.40, 0.41, 0.45]
RANDOM_HARD = [0.20, 0.22, 0.21]
REAL_HARD = 0.90


def result_row(method, mode, per_seed, student="resnet18", seeds=(0, 1, 2), **setting):
    return {
        "method": method, "student": student, "ipc": 10, "label_mode": mode,
        "top1_mean": statistics.fmean(per_seed),
        "top1_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
        "top1_per_seed": list(per_seed), "best_top1_mean": max(per_seed), "seeds": list(seeds),
        **setting,
    }


def metrics_json(*rows):
    return {"dataset": "cifar10", "ipc": 10, "results": list(rows), "priors": {"resnet18": 75.4}}


def standard_rows():
    return [
        result_row("random", "soft", RANDOM_SOFT),
        result_row("random", "hard", RANDOM_HARD),
        result_row("cvdd", "soft", SYN_SOFT),
        result_row("cvdd", "hard", SYN_HARD),
    ]


# Metrics on single values.

def test_hard_label_recovery_hand_value():
    # HLR = 0.90 - 0.60 = 0.30
    assert hard_label_recovery(0.90, 0.60) == pytest.approx(0.30)


def test_hard_label_recovery_negative():
    # HLR = 0.50 - 0.55 = -0.05
    assert hard_label_recovery(0.50, 0.55) == pytest.approx(-0.05)


def test_improvement_over_random_hand_values():
    # IOR = 0.55 - 0.40 = 0.15
    assert improvement_over_random(0.55, 0.40) == pytest.approx(0.15)
    # IOR = 0.30 - 0.35 = -0.05
    assert improvement_over_random(0.30, 0.35) == pytest.approx(-0.05)


def test_alpha_equal_weight_hand_value():
    # alpha = 0.5 * 0.15 - 0.5 * 0.30 = 0.075 - 0.15 = -0.075
    assert alpha_score(0.15, 0.30) == pytest.approx(-0.075)
    assert alpha_score(0.15, 0.30, w=0.5) == pytest.approx(-0.075)


def test_alpha_other_weights():
    # alpha = 0.8 * 0.15 - 0.2 * 0.30 = 0.12 - 0.06 = 0.06
    assert alpha_score(0.15, 0.30, w=0.8) == pytest.approx(0.06)
    # w = 1 keeps only IOR, w = 0 keeps only -HLR.
    assert alpha_score(0.15, 0.30, w=1.0) == pytest.approx(0.15)
    assert alpha_score(0.15, 0.30, w=0.0) == pytest.approx(-0.30)


def test_alpha_extremes():
    # 0.5 * 1 - 0.5 * (-1) = 1 and 0.5 * (-1) - 0.5 * 1 = -1
    assert alpha_score(1.0, -1.0) == 1.0
    assert alpha_score(-1.0, 1.0) == -1.0


def test_lrs_normalization_at_ends():
    assert label_robust_score(-1.0) == pytest.approx(0.0, abs=1e-12)
    assert label_robust_score(1.0) == pytest.approx(1.0)


def test_lrs_at_zero_alpha():
    # (e^0 - e^-1) / (e - e^-1) = (1 - 1/e) / (e - 1/e)
    assert label_robust_score(0.0) == pytest.approx((1 - 1 / E) / (E - 1 / E))
    assert label_robust_score(0.0) == pytest.approx(0.2689, abs=1e-4)


def test_lrs_hand_value():
    # alpha = -0.075 from the equal-weight example above
    assert label_robust_score(-0.075) == pytest.approx((math.exp(-0.075) - 1 / E) / (E - 1 / E))


def test_lrs_increases_with_alpha():
    scores = [label_robust_score(a) for a in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    assert scores == sorted(scores)


# Input checks.

@pytest.mark.parametrize("call, message", [
    (lambda: hard_label_recovery(90.0, 0.6), "top-1 90.0 of real_hard is not a fraction in [0, 1]"),
    (lambda: hard_label_recovery(0.9, 60.0), "top-1 60.0 of syn_hard is not a fraction in [0, 1]"),
    (lambda: improvement_over_random(54.7, 0.4), "top-1 54.7 of syn is not a fraction in [0, 1]"),
    (lambda: improvement_over_random(0.5, 40.2), "top-1 40.2 of random is not a fraction in [0, 1]"),
])
def test_percent_top1_rejected(call, message):
    with pytest.raises(CvddError) as error:
        call()
    assert message in str(error.value)
    assert "divide percentages by 100" in str(error.value)
    assert "\n" not in str(error.value)


def test_negative_top1_rejected():
    with pytest.raises(CvddError, match="not a fraction"):
        improvement_over_random(-0.1, 0.4)


def test_nan_top1_rejected():
    with pytest.raises(CvddError, match="NaN"):
        hard_label_recovery(float("nan"), 0.4)


def test_string_top1_rejected():
    with pytest.raises(CvddError, match="is not a number"):
        hard_label_recovery("0.9", 0.4)


@pytest.mark.parametrize("w", [1.5, -0.1, float("nan")])
def test_alpha_weight_out_of_range(w):
    with pytest.raises(ConfigError) as error:
        alpha_score(0.1, 0.2, w=w)
    assert f"alpha weight w {w!r} is not in [0, 1]" in str(error.value)


def test_alpha_weight_checked_by_fair_metrics():
    with pytest.raises(ConfigError, match="alpha weight w 2 is not in"):
        fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT, REAL_HARD, w=2)


def test_alpha_rejects_percentage_points():
    with pytest.raises(CvddError, match=r"IOR 15.0 is not a difference of fractions in \[-1, 1\]"):
        alpha_score(15.0, 0.30)
    with pytest.raises(CvddError, match="HLR 30.0 .*divide percentage points by 100"):
        alpha_score(0.15, 30.0)


def test_lrs_rejects_alpha_outside_range():
    with pytest.raises(CvddError, match="alpha 1.5 is not a difference"):
        label_robust_score(1.5)


# Statistics over seeds.

def test_seed_statistics_hand_values():
    # mean = (0.50 + 0.52 + 0.54) / 3 = 0.52
    # std = sqrt((0.02^2 + 0 + 0.02^2) / (3 - 1)) = 0.02
    mean, std = seed_statistics([0.50, 0.52, 0.54])
    assert mean == pytest.approx(0.52)
    assert std == pytest.approx(0.02)


def test_seed_statistics_is_sample_std():
    values = [0.61, 0.58, 0.66, 0.60]
    mean, std = seed_statistics(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert std != pytest.approx(statistics.pstdev(values))


def test_seed_statistics_single_seed():
    assert seed_statistics([0.6]) == (0.6, 0.0)


def test_seed_statistics_empty_raises():
    with pytest.raises(CvddError, match="no per-seed values"):
        seed_statistics([])


# fair_metrics: pairing by seed.

def test_fair_metrics_hand_values():
    result = fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT, REAL_HARD)

    # IOR soft per seed: 0.60 - 0.40 = 0.20, 0.62 - 0.41 = 0.21, 0.64 - 0.45 = 0.19
    assert result["ior_soft"]["per_seed"] == pytest.approx([0.20, 0.21, 0.19])
    assert result["ior_soft"]["mean"] == pytest.approx(0.20)
    assert result["ior_soft"]["std"] == pytest.approx(0.01)

    # IOR hard per seed: 0.30 - 0.20 = 0.10, 0.33 - 0.22 = 0.11, 0.36 - 0.21 = 0.15
    assert result["ior_hard"]["per_seed"] == pytest.approx([0.10, 0.11, 0.15])
    assert result["ior_hard"]["mean"] == pytest.approx(0.12)

    # HLR per seed: 0.90 - 0.30 = 0.60, 0.90 - 0.33 = 0.57, 0.90 - 0.36 = 0.54
    assert result["hlr"]["per_seed"] == pytest.approx([0.60, 0.57, 0.54])
    assert result["hlr"]["mean"] == pytest.approx(0.57)
    assert result["hlr"]["std"] == pytest.approx(0.03)

    # alpha per seed: 0.5 * 0.20 - 0.5 * 0.60 = -0.20, 0.5 * 0.21 - 0.5 * 0.57 = -0.18,
    # 0.5 * 0.19 - 0.5 * 0.54 = -0.175
    assert result["alpha"]["per_seed"] == pytest.approx([-0.20, -0.18, -0.175])
    assert result["alpha"]["mean"] == pytest.approx(-0.185)
    assert result["alpha"]["std"] == pytest.approx(statistics.stdev([-0.20, -0.18, -0.175]))

    lrs = [lrs_by_hand(a) for a in (-0.20, -0.18, -0.175)]
    assert result["lrs"]["per_seed"] == pytest.approx(lrs)
    assert result["lrs"]["mean"] == pytest.approx(statistics.fmean(lrs))
    assert result["lrs"]["std"] == pytest.approx(statistics.stdev(lrs))


def test_fair_metrics_reports_inputs():
    result = fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT, REAL_HARD)
    assert result["syn_soft"]["mean"] == pytest.approx(0.62)
    assert result["syn_soft"]["std"] == pytest.approx(0.02)
    assert result["random_hard"]["per_seed"] == RANDOM_HARD
    # A single real top-1 is used for every seed, so its std is 0.
    assert result["real_hard"]["per_seed"] == [0.90, 0.90, 0.90]
    assert result["real_hard"]["std"] == 0.0


def test_ior_mean_matches_ior_of_means():
    # IOR is linear, so the mean of per-seed IOR equals IOR of the mean top-1 values.
    result = fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT, REAL_HARD)
    ior_of_means = statistics.fmean(SYN_SOFT) - statistics.fmean(RANDOM_SOFT)
    assert result["ior_soft"]["mean"] == pytest.approx(ior_of_means)


def test_lrs_averaged_over_seeds():
    # Seed 0: IOR = 1.0 - 0.0 = 1, HLR = 0.0 - 1.0 = -1, alpha = 0.5 + 0.5 = 1, LRS = 1.
    # Seed 1: IOR = 0.0 - 1.0 = -1, HLR = 1.0 - 0.0 = 1, alpha = -0.5 - 0.5 = -1, LRS = 0.
    result = fair_metrics(
        syn_hard=[1.0, 0.0], syn_soft=[1.0, 0.0],
        random_hard=[0.0, 1.0], random_soft=[0.0, 1.0],
        real_hard=[0.0, 1.0],
    )
    assert result["alpha"]["per_seed"] == [1.0, -1.0]
    assert result["alpha"]["mean"] == 0.0
    # Mean of per-seed LRS = (1 + 0) / 2 = 0.5 ...
    assert result["lrs"]["mean"] == pytest.approx(0.5)
    # ... which is not LRS of the mean alpha, LRS(0) ~ 0.2689.
    assert result["lrs"]["mean"] != pytest.approx(label_robust_score(0.0))
    assert result["lrs"]["std"] == pytest.approx(statistics.stdev([1.0, 0.0]))


def test_fair_metrics_pairs_by_position():
    # Reversing the random runs changes each seed's pair, so the std of IOR changes but the mean does not.
    forward = fair_metrics(None, [0.60, 0.70], None, [0.40, 0.60])
    reversed_random = fair_metrics(None, [0.60, 0.70], None, [0.60, 0.40])
    # Paired: 0.60 - 0.40 = 0.20, 0.70 - 0.60 = 0.10. Reversed: 0.60 - 0.60 = 0.0, 0.70 - 0.40 = 0.30.
    assert forward["ior_soft"]["per_seed"] == pytest.approx([0.20, 0.10])
    assert reversed_random["ior_soft"]["per_seed"] == pytest.approx([0.0, 0.30])
    assert forward["ior_soft"]["mean"] == pytest.approx(reversed_random["ior_soft"]["mean"])
    assert forward["ior_soft"]["std"] != pytest.approx(reversed_random["ior_soft"]["std"])


def test_fair_metrics_without_real_hard():
    result = fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT)
    assert result["ior_soft"] is not None
    assert result["ior_hard"] is not None
    assert result["real_hard"] is None
    assert result["hlr"] is None
    assert result["alpha"] is None
    assert result["lrs"] is None


def test_fair_metrics_without_soft_runs():
    result = fair_metrics(SYN_HARD, None, RANDOM_HARD, None, REAL_HARD)
    assert result["ior_soft"] is None
    assert result["ior_hard"]["mean"] == pytest.approx(0.12)
    assert result["hlr"]["mean"] == pytest.approx(0.57)
    # alpha uses IOR under the soft-label protocol, so it is missing too.
    assert result["alpha"] is None
    assert result["lrs"] is None


def test_fair_metrics_single_seed_std_zero():
    result = fair_metrics([0.30], [0.60], [0.20], [0.40], 0.90)
    assert result["lrs"]["std"] == 0.0
    assert result["alpha"]["mean"] == pytest.approx(0.5 * 0.20 - 0.5 * 0.60)


def test_fair_metrics_mismatched_lengths():
    with pytest.raises(CvddError) as error:
        fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT[:2], REAL_HARD)
    assert "random_soft has 2 per-seed values but the others have 3" in str(error.value)
    assert "\n" not in str(error.value)


def test_fair_metrics_real_hard_length_mismatch():
    with pytest.raises(CvddError, match="real_hard has 2 per-seed values but the others have 3"):
        fair_metrics(SYN_HARD, SYN_SOFT, RANDOM_HARD, RANDOM_SOFT, [0.9, 0.9])


def test_fair_metrics_percent_input():
    with pytest.raises(CvddError, match=r"top-1 60.0 of syn_soft is not a fraction in \[0, 1\]"):
        fair_metrics(SYN_HARD, [60.0, 62.0, 64.0], RANDOM_HARD, RANDOM_SOFT)


def test_fair_metrics_without_inputs():
    with pytest.raises(CvddError, match="no per-seed top-1 values"):
        fair_metrics(None, None, None, None)


# fair_rows: metrics.json.

def test_fair_rows_hand_values():
    rows = fair_rows(metrics_json(*standard_rows()), real_hard={"resnet18": REAL_HARD})
    assert len(rows) == 1
    row = rows[0]
    assert (row["method"], row["student"], row["ipc"]) == ("cvdd", "resnet18", 10)
    assert row["seeds"] == [0, 1, 2]
    assert row["alpha_weight"] == 0.5

    assert row["syn_soft_mean"] == pytest.approx(0.62)
    assert row["syn_hard_mean"] == pytest.approx(0.33)
    assert row["random_soft_mean"] == pytest.approx(statistics.fmean(RANDOM_SOFT))
    assert row["random_hard_std"] == pytest.approx(statistics.stdev(RANDOM_HARD))
    assert row["ior_soft_mean"] == pytest.approx(0.20)
    assert row["ior_soft_std"] == pytest.approx(0.01)
    assert row["hlr_mean"] == pytest.approx(0.57)
    assert row["alpha_mean"] == pytest.approx(-0.185)
    lrs = [lrs_by_hand(a) for a in (-0.20, -0.18, -0.175)]
    assert row["lrs_mean"] == pytest.approx(statistics.fmean(lrs))
    assert row["lrs_std"] == pytest.approx(statistics.stdev(lrs))


def test_fair_rows_skip_random_keep_order():
    rows = standard_rows() + [
        result_row("sre2l", "soft", [0.50, 0.51, 0.52]),
        result_row("sre2l", "hard", [0.25, 0.26, 0.27]),
    ]
    result = fair_rows(metrics_json(*rows))
    assert [r["method"] for r in result] == ["cvdd", "sre2l"]
    # IOR soft of sre2l: 0.50 - 0.40 = 0.10, 0.51 - 0.41 = 0.10, 0.52 - 0.45 = 0.07
    assert result[1]["ior_soft_mean"] == pytest.approx(0.09)


def test_fair_rows_without_real_hard():
    row = fair_rows(metrics_json(*standard_rows()))[0]
    assert row["ior_soft_mean"] == pytest.approx(0.20)
    assert row["hlr_mean"] is None
    assert row["alpha_mean"] is None
    assert row["lrs_mean"] is None
    assert row["lrs_std"] is None


def test_fair_rows_real_hard_other_student():
    row = fair_rows(metrics_json(*standard_rows()), real_hard={"convnet": 0.8})[0]
    assert row["hlr_mean"] is None


def test_fair_rows_real_hard_per_seed():
    row = fair_rows(metrics_json(*standard_rows()), real_hard={"resnet18": [0.90, 0.91, 0.92]})[0]
    # HLR per seed: 0.90 - 0.30 = 0.60, 0.91 - 0.33 = 0.58, 0.92 - 0.36 = 0.56
    assert row["hlr_mean"] == pytest.approx(0.58)
    assert row["hlr_std"] == pytest.approx(0.02)


def test_fair_rows_custom_weight():
    row = fair_rows(metrics_json(*standard_rows()), real_hard={"resnet18": REAL_HARD}, w=1.0)[0]
    # With w = 1, alpha equals IOR soft.
    assert row["alpha_mean"] == pytest.approx(0.20)
    assert row["alpha_weight"] == 1.0


def test_fair_rows_soft_only_method():
    rows = standard_rows() + [result_row("sre2l", "soft", [0.50, 0.51, 0.52])]
    row = fair_rows(metrics_json(*rows), real_hard={"resnet18": REAL_HARD})[1]
    assert row["method"] == "sre2l"
    assert row["syn_hard_mean"] is None
    assert row["ior_hard_mean"] is None
    assert row["hlr_mean"] is None
    assert row["ior_soft_mean"] == pytest.approx(0.09)


def test_fair_rows_ablation_setting():
    rows = standard_rows() + [
        result_row("cvdd", "soft", [0.70, 0.71, 0.72], temperature=5),
    ]
    result = fair_rows(metrics_json(*rows))
    assert len(result) == 2
    ablation = result[1]
    assert ablation["temperature"] == 5
    # Compared with the plain random row: 0.70 - 0.40, 0.71 - 0.41, 0.72 - 0.45 -> mean 0.29
    assert ablation["ior_soft_mean"] == pytest.approx(0.29)


def test_fair_rows_ablation_random_preferred():
    rows = standard_rows() + [
        result_row("random", "soft", [0.50, 0.50, 0.50], temperature=5),
        result_row("cvdd", "soft", [0.70, 0.71, 0.72], temperature=5),
    ]
    ablation = fair_rows(metrics_json(*rows))[1]
    # The random row with the same temperature wins: 0.70 - 0.50, 0.71 - 0.50, 0.72 - 0.50 -> 0.21
    assert ablation["ior_soft_mean"] == pytest.approx(0.21)


def test_fair_rows_per_student():
    rows = standard_rows() + [
        result_row("random", "soft", [0.30, 0.30, 0.30], student="convnet"),
        result_row("cvdd", "soft", [0.45, 0.45, 0.45], student="convnet"),
    ]
    result = fair_rows(metrics_json(*rows))
    convnet = [r for r in result if r["student"] == "convnet"][0]
    # 0.45 - 0.30 = 0.15 for every seed
    assert convnet["ior_soft_mean"] == pytest.approx(0.15)
    assert convnet["ior_soft_std"] == pytest.approx(0.0)


def test_fair_rows_missing_random_row():
    rows = [result_row("cvdd", "soft", SYN_SOFT), result_row("cvdd", "hard", SYN_HARD)]
    with pytest.raises(CvddError) as error:
        fair_rows(metrics_json(*rows))
    assert "metrics.json has no random row for student resnet18 at IPC 10" in str(error.value)
    assert "\n" not in str(error.value)


def test_fair_rows_random_other_student():
    rows = [result_row("random", "soft", RANDOM_SOFT, student="convnet"), result_row("cvdd", "soft", SYN_SOFT)]
    with pytest.raises(CvddError, match="no random row for student resnet18"):
        fair_rows(metrics_json(*rows))


def test_fair_rows_mismatched_seeds():
    rows = [
        result_row("random", "soft", [0.40, 0.41], seeds=(0, 1)),
        result_row("cvdd", "soft", SYN_SOFT),
    ]
    with pytest.raises(CvddError) as error:
        fair_rows(metrics_json(*rows))
    message = str(error.value)
    assert "seeds [0, 1] of random/resnet18 soft do not match seeds [0, 1, 2] of cvdd/resnet18 soft" in message
    assert "\n" not in message


def test_fair_rows_same_count_other_seeds():
    rows = [
        result_row("random", "soft", RANDOM_SOFT, seeds=(3, 4, 5)),
        result_row("cvdd", "soft", SYN_SOFT),
    ]
    with pytest.raises(CvddError, match=r"seeds \[3, 4, 5\] of random/resnet18 soft do not match"):
        fair_rows(metrics_json(*rows))


def test_fair_rows_percent_top1():
    rows = standard_rows()
    rows[2] = result_row("cvdd", "soft", [54.7, 55.0, 54.9])
    with pytest.raises(CvddError) as error:
        fair_rows(metrics_json(*rows))
    message = str(error.value)
    assert "top-1 54.7 of cvdd/resnet18 soft is not a fraction in [0, 1]; divide percentages by 100" in message


def test_fair_rows_duplicate_rows():
    rows = standard_rows() + [result_row("cvdd", "soft", SYN_SOFT)]
    with pytest.raises(CvddError, match="two soft rows"):
        fair_rows(metrics_json(*rows))


def test_fair_rows_missing_results():
    with pytest.raises(CvddError, match="metrics has no 'results' list"):
        fair_rows({"dataset": "cifar10"})


def test_fair_rows_row_missing_keys():
    row = result_row("cvdd", "soft", SYN_SOFT)
    del row["top1_per_seed"]
    with pytest.raises(CvddError, match="row 0 of metrics.json results is missing top1_per_seed"):
        fair_rows(metrics_json(row))


# Markdown table.

def test_format_fair_table_cells():
    rows = fair_rows(metrics_json(*standard_rows()), real_hard={"resnet18": REAL_HARD})
    text = format_fair_table(rows)
    lines = text.splitlines()

    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "student", "IPC"]
    assert "soft top-1 (%)" in header
    assert "IOR soft (pp)" in header
    assert "HLR (pp)" in header
    assert "alpha (fraction)" in header
    assert "LRS (%)" in header
    assert lines[1] == "|" + "---|" * len(header)

    cells = dict(zip(header, [cell.strip() for cell in lines[2].strip("|").split("|")]))
    assert cells["method"] == "cvdd"
    assert cells["IPC"] == "10"
    # 0.62 -> 62.00 %, std 0.02 -> 2.00
    assert cells["soft top-1 (%)"] == "62.00 ± 2.00"
    # IOR soft 0.20 ± 0.01 -> +20.00 ± 1.00 percentage points
    assert cells["IOR soft (pp)"] == "+20.00 ± 1.00"
    assert cells["HLR (pp)"] == "+57.00 ± 3.00"
    assert cells["alpha (fraction)"].startswith("-0.185 ± ")
    assert cells["LRS (%)"] == f"{100 * rows[0]['lrs_mean']:.2f} ± {100 * rows[0]['lrs_std']:.2f}"
    assert "w = 0.5" in text


def test_format_fair_table_missing_metrics():
    rows = fair_rows(metrics_json(*standard_rows()))
    lines = format_fair_table(rows).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = dict(zip(header, [cell.strip() for cell in lines[2].strip("|").split("|")]))
    assert cells["HLR (pp)"] == "-"
    assert cells["LRS (%)"] == "-"
    assert cells["real hard (%)"] == "-"


def test_format_fair_table_shared_setting_line():
    rows = [result_row(method, "soft", per_seed, temperature=5) for method, per_seed in
            (("random", [0.40, 0.42, 0.44]), ("sre2l++", [0.30, 0.31, 0.32]), ("cvdd", [0.50, 0.51, 0.52]))]
    lines = format_fair_table(fair_rows(metrics_json(*rows))).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "setting" not in header
    cells = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:4]]
    assert [c["method"] for c in cells] == ["sre2l++", "cvdd"]
    # cvdd against random per seed: 0.10, 0.09, 0.08, so IOR is 9.00 pp with std 1.00.
    assert (cells[1]["soft top-1 (%)"], cells[1]["IOR soft (pp)"]) == ("51.00 ± 1.00", "+9.00 ± 1.00")
    assert lines[4:6] == ["", "Setting of every row: temperature=5."]


def test_format_fair_table_setting_column():
    rows = standard_rows() + [result_row("cvdd", "soft", [0.70, 0.71, 0.72], temperature=5)]
    lines = format_fair_table(fair_rows(metrics_json(*rows))).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "setting" in header
    settings = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))["setting"] for line in lines[2:4]]
    assert settings == ["-", "temperature=5"]
