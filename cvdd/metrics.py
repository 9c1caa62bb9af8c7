"""DD-Ranking metrics that compare a distilled set fairly with a random real subset.

Every accuracy here is a top-1 fraction in [0, 1], as stored in metrics.json. The metrics
are those of the DD-Ranking benchmark (NUS-HPC-AI-Lab/DD-Ranking):

- HLR, hard-label recovery = acc(real, hard) - acc(syn, hard). It is the top-1 that the
  distilled images still lose against the full real training set when both train a student
  with plain cross-entropy on hard labels. Lower is better.
- IOR, improvement over random = acc(syn) - acc(random subset), both under one protocol
  (soft labels from the teacher committee, or hard labels). Higher is better.
- alpha = w * IOR - (1 - w) * HLR, with w = 0.5 by default, in [-1, 1].
- LRS, label-robust score = (e^alpha - e^-1) / (e - e^-1), which maps alpha = -1, 0, 1 to
  0, (1 - 1/e) / (e - 1/e) ~ 0.2689 and 1.

Metrics over several seeds pair the runs by seed, compute the metric per seed, and report
the mean and the sample standard deviation (ddof=1, 0.0 for one seed) of those values.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from numbers import Real

from .errors import ConfigError, CvddError

DEFAULT_ALPHA_WEIGHT = 0.5

# Keys of a metrics.json row that contain results. Every other key is part of the setting.
_RESULT_KEYS = frozenset({"label_mode", "top1_mean", "top1_std", "top1_per_seed", "best_top1_mean", "seeds"})

# Row keys that fair_rows computes, each stored as <key>_mean and <key>_std.
FAIR_KEYS = ("syn_soft", "syn_hard", "random_soft", "random_hard", "real_hard",
             "ior_soft", "ior_hard", "hlr", "alpha", "lrs")


# Checks on single values.

def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise CvddError(f"{name} {value!r} is not a number; pass accuracies as floats")
    if math.isnan(value):
        raise CvddError(f"{name} is NaN; check the evaluation that produced it")
    return float(value)


def check_fraction(value: float, source: str = "") -> float:
    """Return `value` as a float, or raise CvddError unless it is a top-1 fraction in [0, 1].

    `source` names the accuracy in the error message, e.g. "cvdd/resnet18 soft".
    """
    name = f"top-1 of {source}" if source else "top-1"
    value = _check_number(value, name)
    if not 0.0 <= value <= 1.0:
        of_source = f" of {source}" if source else ""
        raise CvddError(f"top-1 {value}{of_source} is not a fraction in [0, 1]; divide percentages by 100")
    return value


def _check_difference(value: float, name: str) -> float:
    # IOR, HLR and alpha are differences or weighted sums of fractions, so they lie in [-1, 1].
    value = _check_number(value, name)
    if not -1.0 <= value <= 1.0:
        raise CvddError(f"{name} {value} is not a difference of fractions in [-1, 1]; "
                        "divide percentage points by 100")
    return value


def check_alpha_weight(w: float) -> float:
    """Return `w` as a float, or raise ConfigError unless it is a weight in [0, 1]."""
    if isinstance(w, bool) or not isinstance(w, Real) or not 0.0 <= w <= 1.0:
        raise ConfigError(f"alpha weight w {w!r} is not in [0, 1]; pass a weight between 0 and 1 "
                          f"(the default is {DEFAULT_ALPHA_WEIGHT})")
    return float(w)


# Metrics on single values.

def hard_label_recovery(real_hard: float, syn_hard: float) -> float:
    """Compute HLR = real_hard - syn_hard, a fraction in [-1, 1]. Lower is better.

    Args:
        real_hard: hard-label top-1 of a student trained on the full real training set.
        syn_hard: hard-label top-1 of the same student trained on the distilled set.
    """
    return check_fraction(real_hard, "real_hard") - check_fraction(syn_hard, "syn_hard")


def improvement_over_random(syn: float, random: float) -> float:
    """Compute IOR = syn - random, a fraction in [-1, 1]. Higher is better.

    Both top-1 values must come from the same protocol (both soft labels or both hard labels)
    and the same IPC.
    """
    return check_fraction(syn, "syn") - check_fraction(random, "random")


def alpha_score(ior: float, hlr: float, w: float = DEFAULT_ALPHA_WEIGHT) -> float:
    """Compute alpha = w * IOR - (1 - w) * HLR, in [-1, 1].

    Raises:
        ConfigError: `w` is outside [0, 1].
        CvddError: `ior` or `hlr` is outside [-1, 1], which usually means percentage points.
    """
    w = check_alpha_weight(w)
    ior = _check_difference(ior, "IOR")
    hlr = _check_difference(hlr, "HLR")
    alpha = w * ior - (1.0 - w) * hlr
    # The exact value lies in [-1, 1], so the clamp only removes rounding error at the ends.
    return min(1.0, max(-1.0, alpha))


def label_robust_score(alpha: float) -> float:
    """Compute LRS = (e^alpha - e^-1) / (e - e^-1), which maps alpha in [-1, 1] onto [0, 1]."""
    alpha = _check_difference(alpha, "alpha")
    low, high = math.exp(-1.0), math.exp(1.0)
    return (math.exp(alpha) - low) / (high - low)


# Statistics over seeds.

def seed_statistics(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (ddof=1) of per-seed values.

    The standard deviation of a single value is 0.0. An empty sequence raises CvddError.
    """
    values = [float(v) for v in values]
    if not values:
        raise CvddError("no per-seed values to summarize; evaluate at least one seed")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _summary(per_seed: list[float] | None) -> dict | None:
    if per_seed is None:
        return None
    mean, std = seed_statistics(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def _per_seed_fractions(values: Sequence[float] | None, name: str, count: int) -> list[float] | None:
    if values is None:
        return None
    values = list(values)
    if len(values) != count:
        raise CvddError(f"{name} has {len(values)} per-seed values but the others have {count}; "
                        "pass one value per seed, in the same seed order")
    return [check_fraction(v, name) for v in values]


def fair_metrics(syn_hard: Sequence[float] | None, syn_soft: Sequence[float] | None,
                 random_hard: Sequence[float] | None, random_soft: Sequence[float] | None,
                 real_hard: float | Sequence[float] | None = None,
                 w: float = DEFAULT_ALPHA_WEIGHT) -> dict[str, dict | None]:
    """Compute the DD-Ranking metrics per seed and summarize them over seeds.

    Args:
        syn_hard, syn_soft: per-seed top-1 of students trained on the distilled set with hard
            labels (cross-entropy) and with soft labels (KL to the teacher committee).
        random_hard, random_soft: the same for a random real subset at the same IPC.
        real_hard: hard-label top-1 on the full real training set, either one value used for
            every seed or one value per seed. Without it, HLR, alpha and LRS are None.
        w: weight of IOR in alpha.

    The sequences are paired by position, so element i of each must come from seed i.
    A sequence may be None when that run is missing, and every metric that needs it is None.

    Returns:
        {key: {"mean": float, "std": float, "per_seed": [float, ...]} or None} for the keys of
        FAIR_KEYS. "ior_soft" and "ior_hard" are IOR under the soft-label and the hard-label
        protocol. alpha and LRS use IOR under the soft-label protocol, because that is the
        protocol the distillation methods are evaluated with. LRS is computed per seed and
        then averaged, so its mean is the mean of per-seed LRS, not LRS of the mean alpha.
        The two differ because LRS is not linear in alpha.

    Raises:
        CvddError: a top-1 is outside [0, 1], or the sequences differ in length.
        ConfigError: `w` is outside [0, 1].
    """
    w = check_alpha_weight(w)
    inputs = {"syn_hard": syn_hard, "syn_soft": syn_soft, "random_hard": random_hard, "random_soft": random_soft}
    if not isinstance(real_hard, Real) and real_hard is not None:
        inputs["real_hard"] = real_hard
    lengths = [len(v) for v in inputs.values() if v is not None]
    if not lengths:
        raise CvddError("no per-seed top-1 values given; pass at least one of syn_hard, syn_soft, "
                        "random_hard, random_soft")
    count = lengths[0]
    per_seed = {name: _per_seed_fractions(values, name, count) for name, values in inputs.items()}
    if isinstance(real_hard, Real):
        per_seed["real_hard"] = [check_fraction(real_hard, "real_hard")] * count
    per_seed.setdefault("real_hard", None)

    def paired(function, first: str, second: str) -> list[float] | None:
        if per_seed[first] is None or per_seed[second] is None:
            return None
        return [function(a, b) for a, b in zip(per_seed[first], per_seed[second])]

    per_seed["ior_soft"] = paired(improvement_over_random, "syn_soft", "random_soft")
    per_seed["ior_hard"] = paired(improvement_over_random, "syn_hard", "random_hard")
    per_seed["hlr"] = paired(hard_label_recovery, "real_hard", "syn_hard")

    per_seed["alpha"] = None
    per_seed["lrs"] = None
    if per_seed["ior_soft"] is not None and per_seed["hlr"] is not None:
        per_seed["alpha"] = [alpha_score(ior, hlr, w) for ior, hlr in zip(per_seed["ior_soft"], per_seed["hlr"])]
        per_seed["lrs"] = [label_robust_score(alpha) for alpha in per_seed["alpha"]]

    return {key: _summary(per_seed[key]) for key in FAIR_KEYS}


# Rows of metrics.json.

def _setting_key(setting: dict) -> str:
    # Settings may hold lists (e.g. "committee"), so a sorted JSON text serves as the dict key.
    return json.dumps(setting, sort_keys=True, default=str)


def _group_rows(results: list) -> dict[str, tuple[dict, dict[str, dict]]]:
    """Group metrics.json rows by setting, as {setting key: (setting, {label_mode: row})}."""
    groups: dict[str, tuple[dict, dict[str, dict]]] = {}
    for index, row in enumerate(results):
        missing = [k for k in ("method", "student", "label_mode", "top1_per_seed") if k not in row]
        if missing:
            raise CvddError(f"row {index} of metrics.json results is missing {', '.join(missing)}; "
                            "write metrics.json with cvdd.pipeline.summarize")
        setting = {k: v for k, v in row.items() if k not in _RESULT_KEYS}
        setting_key = _setting_key(setting)
        _, modes = groups.setdefault(setting_key, (setting, {}))
        mode = row["label_mode"]
        if mode in modes:
            raise CvddError(f"metrics.json has two {mode} rows for {setting_key}; "
                            "keep one row per setting and label mode")
        modes[mode] = row
    return groups


def _find_random_modes(setting: dict, groups: dict) -> dict[str, dict]:
    """Return the random rows, by label mode, that `setting` is compared with.

    A random row with the same setting apart from the method comes first (for ablations that
    also evaluate random), then the plain random row with the same student and IPC.

    NOTE: an ablation that changes the evaluation protocol (e.g. "committee") falls back to a
    random row evaluated under the default protocol unless random was also run in that setting.
    """
    candidates = [
        {**setting, "method": "random"},
        {"method": "random", "student": setting["student"], "ipc": setting.get("ipc")},
    ]
    for candidate in candidates:
        if candidate.get("ipc") is None:
            candidate.pop("ipc", None)
        found = groups.get(_setting_key(candidate))
        if found is not None:
            return found[1]
    ipc_text = f" at IPC {setting['ipc']}" if setting.get("ipc") is not None else ""
    raise CvddError(f"metrics.json has no random row for student {setting['student']}{ipc_text}; "
                    "add random to the methods of the run and evaluate it with the same students")


def _row_name(row: dict) -> str:
    return f"{row['method']}/{row['student']} {row['label_mode']}"


def _row_top1(row: dict | None) -> list[float] | None:
    if row is None:
        return None
    return [check_fraction(v, _row_name(row)) for v in row["top1_per_seed"]]


def _check_same_seeds(rows: list[dict]) -> None:
    """Raise CvddError unless every row lists the same seeds in the same order."""
    rows = [r for r in rows if r is not None]
    first = rows[0]
    for row in rows[1:]:
        first_seeds = first.get("seeds", list(range(len(first["top1_per_seed"]))))
        row_seeds = row.get("seeds", list(range(len(row["top1_per_seed"]))))
        if list(first_seeds) != list(row_seeds):
            raise CvddError(f"seeds {list(row_seeds)} of {_row_name(row)} do not match seeds "
                            f"{list(first_seeds)} of {_row_name(first)}; evaluate both with the same seeds")


def fair_rows(metrics: Mapping, real_hard: Mapping[str, float | Sequence[float]] | None = None,
              w: float = DEFAULT_ALPHA_WEIGHT) -> list[dict]:
    """Compute the DD-Ranking metrics for every method of a metrics.json dict.

    Args:
        metrics: the dict read from metrics.json. Its "results" rows contain "method",
            "student", "ipc", "label_mode" ("soft" or "hard"), "top1_per_seed" and "seeds".
            Any other key (e.g. "temperature" of an ablation) is part of the setting.
        real_hard: {student: hard-label top-1 on the full real training set}, as one fraction
            or a list with one fraction per seed, in the order of the rows' "seeds". A student
            that is missing gets None for HLR, alpha and LRS.
        w: weight of IOR in alpha.

    Returns:
        One row per setting (method, student, ipc and any ablation keys) other than method
        "random", in the order of the first row of each setting. Each row contains the setting,
        "seeds", "alpha_weight", and <key>_mean and <key>_std for every key of FAIR_KEYS (see
        fair_metrics). A value is None where its metric needs a label mode or a real top-1 that
        is missing.

    Raises:
        CvddError: a random row for a student is missing, seeds of paired rows differ, two
            rows share a setting and label mode, or a top-1 is not a fraction in [0, 1].
        ConfigError: `w` is outside [0, 1].
    """
    w = check_alpha_weight(w)
    results = metrics.get("results") if isinstance(metrics, Mapping) else None
    if not isinstance(results, list):
        raise CvddError("metrics has no 'results' list; pass the dict read from metrics.json")
    real_hard = real_hard or {}

    groups = _group_rows(results)
    rows = []
    for setting, modes in groups.values():
        if setting["method"] == "random":
            continue
        random_modes = _find_random_modes(setting, groups)
        paired_rows = [modes.get("soft"), modes.get("hard"), random_modes.get("soft"), random_modes.get("hard")]
        _check_same_seeds(paired_rows)

        summaries = fair_metrics(
            syn_hard=_row_top1(modes.get("hard")), syn_soft=_row_top1(modes.get("soft")),
            random_hard=_row_top1(random_modes.get("hard")), random_soft=_row_top1(random_modes.get("soft")),
            real_hard=real_hard.get(setting["student"]), w=w,
        )

        any_row = next(r for r in paired_rows if r is not None)
        row = {**setting, "seeds": list(any_row.get("seeds", range(len(any_row["top1_per_seed"]))))}
        row["alpha_weight"] = w
        for key in FAIR_KEYS:
            summary = summaries[key]
            row[f"{key}_mean"] = summary["mean"] if summary else None
            row[f"{key}_std"] = summary["std"] if summary else None
        rows.append(row)
    return rows


# Markdown table.

_SETTING_COLUMNS = ("method", "student", "ipc")

# (header, key, scale, signed): cells show mean ± std times scale, with a leading + or - when signed is True.
_TABLE_COLUMNS = (
    ("soft top-1 (%)", "syn_soft", 100.0, False),
    ("hard top-1 (%)", "syn_hard", 100.0, False),
    ("random soft (%)", "random_soft", 100.0, False),
    ("random hard (%)", "random_hard", 100.0, False),
    ("real hard (%)", "real_hard", 100.0, False),
    ("IOR soft (pp)", "ior_soft", 100.0, True),
    ("IOR hard (pp)", "ior_hard", 100.0, True),
    ("HLR (pp)", "hlr", 100.0, True),
    ("alpha (fraction)", "alpha", 1.0, True),
    ("LRS (%)", "lrs", 100.0, False),
)


def _format_cell(row: dict, key: str, scale: float, signed: bool) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    digits = 3 if scale == 1.0 else 2
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.{digits}f} ± {scale * std:.{digits}f}"


# Label that starts the line under a table naming the setting every row shares.
SHARED_SETTING_LABEL = "Setting of every row"


def shared_setting(settings: Sequence[str]) -> str:
    """Return the setting cell of every row when there are several rows and all cells match, else "".

    Such a setting goes on one line under the table (shared_setting_line) instead of into each row.
    """
    return settings[0] if len(settings) > 1 and len(set(settings)) == 1 else ""


def shared_setting_line(setting: str) -> str:
    """Format the line under a table that names the setting every row shares."""
    return f"{SHARED_SETTING_LABEL}: {setting}."


def format_fair_table(rows: Sequence[dict]) -> str:
    """Format rows from fair_rows as a markdown table with a short legend below it.

    Accuracies are in percent. IOR and HLR are signed percentage points (pp), alpha is a
    signed fraction in [-1, 1], and LRS is in percent. Each cell is mean ± sample std over
    seeds, or "-" where the metric is missing. Ablation keys go into a "setting" column, or
    into one line under the table when every row has the same ones.
    """
    extra_keys = sorted({k for row in rows for k in row
                         if k not in _SETTING_COLUMNS and k not in ("seeds", "alpha_weight")
                         and not k.endswith(("_mean", "_std"))})
    settings = [", ".join(f"{k}={row[k]}" for k in extra_keys if k in row) or "-" for row in rows]
    shared = shared_setting(settings) if extra_keys else ""
    with_setting = bool(extra_keys) and not shared
    headers = ["method", "student", "IPC"] + (["setting"] if with_setting else [])
    headers += [header for header, *_ in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]

    for row, setting in zip(rows, settings):
        cells = [str(row.get("method", "-")), str(row.get("student", "-")), str(row.get("ipc", "-"))]
        if with_setting:
            cells.append(setting)
        cells += [_format_cell(row, key, scale, signed) for _, key, scale, signed in _TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")

    weights = sorted({row["alpha_weight"] for row in rows if row.get("alpha_weight") is not None})
    weight_text = ", ".join(f"{w:g}" for w in weights) or f"{DEFAULT_ALPHA_WEIGHT:g}"
    lines.append("")
    if shared:
        lines.append(shared_setting_line(shared))
    lines.append("IOR = syn top-1 - random top-1 under one protocol. HLR = real hard top-1 - syn hard top-1.")
    lines.append(f"alpha = w·IOR(soft) - (1 - w)·HLR with w = {weight_text}. LRS = (e^alpha - e^-1) / (e - e^-1).")
    lines.append("Cells are mean ± sample std (ddof=1) over seeds.")
    return "\n".join(lines)
