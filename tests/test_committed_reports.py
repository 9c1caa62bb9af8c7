"""Committed reports: their tables match the metrics.json beside them and regenerate unchanged.

They catch a report left stale after its run folder changed. They also catch a results.md
edited by hand.
"""

import json
import shutil
import statistics
from pathlib import Path

import pytest

from cvdd.metrics import SHARED_SETTING_LABEL
from cvdd.report import list_experiments, load_experiment, rewrite_results, study_parts, write_study_index

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"


def _committed_reports():
    specs = [load_experiment(name) for name in list_experiments()]
    return [s for s in specs if (REPORTS / s.folder / "metrics.json").is_file()]


COMMITTED = _committed_reports()


def _results_rows(markdown: str) -> list[dict[str, str]]:
    """Read the rows of the '## Results' table of a results.md as {column: cell}.

    A setting that every row shares is written once under the table. Here it fills each
    row's setting cell.
    """
    section = markdown.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [x for x in section.splitlines() if x.startswith("|")]
    header = _cells(lines[0])
    rows = [dict(zip(header, _cells(line))) for line in lines[2:]]
    shared = [x for x in section.splitlines() if x.startswith(SHARED_SETTING_LABEL + ": ")]
    if shared:
        assert "setting" not in header
        setting = shared[0].removeprefix(SHARED_SETTING_LABEL + ": ").removesuffix(".")
        rows = [{**row, "setting": setting} for row in rows]
    return rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_there_are_committed_reports():
    assert {"digits", "cifar10-cpu", "fidelity-cifar10-table1"} <= {s.name for s in COMMITTED}


@pytest.mark.parametrize("spec", COMMITTED, ids=lambda s: s.name)
def test_results_table_matches_per_seed_top1(spec):
    metrics = json.loads((REPORTS / spec.folder / "metrics.json").read_text())
    rows = _results_rows((REPORTS / spec.folder / "results.md").read_text())
    assert rows
    by_key = {(r["method"], r["student"], r.get("variant", ""), r["label_mode"]): r for r in metrics["results"]}
    for row in rows:
        for column, mode in (("soft label", "soft"), ("hard label", "hard")):
            # The setting cell is the variant's name, with its overrides in parentheses after it.
            variant = row.get("setting", "").split(" (")[0]
            result = by_key.get((row["method"], row["student"], variant, mode))
            if result is None:
                assert row.get(column, "-") in ("-", "")
                continue
            per_seed = [100 * x for x in result["top1_per_seed"]]
            spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            # Two decimals: within half a unit of the last digit (a tie may round either way).
            mean_cell, spread_cell = (float(x) for x in row[column].split(" ± "))
            assert mean_cell == pytest.approx(statistics.fmean(per_seed), abs=0.005 + 1e-9), (row, column)
            assert spread_cell == pytest.approx(spread, abs=0.005 + 1e-9), (row, column)


@pytest.mark.parametrize("spec", COMMITTED, ids=lambda s: s.name)
def test_report_metrics_match_run_folder(spec):
    from cvdd.config import load_config

    run_dir = ROOT / (spec.run_dir or load_config(ROOT / spec.config).resolved_run_dir())
    source = run_dir / spec.metrics_file
    if not source.is_file():
        pytest.skip(f"{source} is not committed (the run folder is made by `cvdd report {spec.name}`)")
    report = json.loads((REPORTS / spec.folder / "metrics.json").read_text())
    report.pop("notebook_seconds", None)
    assert report == json.loads(source.read_text())


@pytest.mark.parametrize("spec", COMMITTED, ids=lambda s: s.name)
def test_results_md_regenerates_unchanged(spec, tmp_path):
    copy = tmp_path / "reports" / spec.folder
    shutil.copytree(REPORTS / spec.folder, copy)
    rewrite_results(spec.name, reports_dir=tmp_path / "reports")
    assert (copy / "results.md").read_text() == (REPORTS / spec.folder / "results.md").read_text()


def test_study_index_regenerates_unchanged(tmp_path):
    study = "fidelity-cifar10"
    assert study_parts(study)
    shutil.copytree(REPORTS / study, tmp_path / study)
    index = write_study_index(study, reports_dir=tmp_path)
    assert index.read_text() == (REPORTS / study / "results.md").read_text()
