"""The notebooks, executed as a user's batch job would run them: papermill and nbval, tiny parameters.

00_quickstart runs the whole pipeline once into a module-wide run folder: two members,
IPC 2, a few iterations and epochs. The other notebooks read that run folder, as they do in
a report.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from cvdd.report import collect_reports

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
MEMBERS = ["resnet18", "mobilenet_v2"]
TINY = {
    "committee.members": MEMBERS, "train.epochs": 2, "prior.member_epochs": 1, "prior.iterations": 5,
    "prior.student_epochs": 3, "synthesis.ipc": 2, "synthesis.iterations": 5, "evaluate.epochs": 3,
    "evaluate.eval_every": 1, "evaluate.seeds": [0, 1], "workers": 1,
}
# Extra parameters per notebook, on top of config, run_dir, overrides and figures_dir.
EXTRA = {
    "03_synthesis": {"members": MEMBERS, "iterations": 6, "update_every": 3},
    "05_post_evaluation": {"students": ["resnet18", "mobilenet_v2"]},
    "08_ablation": {"ablation": "temperature", "variants": {"T1": {"synthesis.temperature": 1.0},
                                                            "T50": {"synthesis.temperature": 50.0}}},
}
# The figures each notebook saves into figures_dir.
FIGURES = {
    "00_quickstart": ["quickstart_cvdd_images"],
    "01_committee": ["committee_accuracy"],
    "02_prior_performance": ["weights_vs_temperature"],
    "03_synthesis": ["synthesis_progress", "synthesis_images"],
    "04_soft_labels_bssl": ["bn_statistics_real_vs_distilled", "embedding_statistics_bssl"],
    "05_post_evaluation": ["student_curves"],
    "06_analysis": ["cosine_pixels", "cosine_features", "tsne_sre2lpp", "tsne_cvdd", "images_sre2lpp", "images_cvdd"],
    "08_ablation": ["ablation_temperature"],
}


@pytest.fixture(autouse=True)
def quiet_progress(monkeypatch):
    # Kernels inherit the environment: no progress widgets in the executed notebooks.
    monkeypatch.setenv("CVDD_NO_PROGRESS", "1")


def execute(name: str, out_dir: Path, **parameters) -> nbformat.NotebookNode:
    """Run notebooks/NAME.ipynb with papermill into out_dir and return the executed notebook."""
    out = out_dir / f"{name}.ipynb"
    try:
        papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                                   cwd=str(NOTEBOOKS), progress_bar=False)
    finally:
        executed = nbformat.read(out, as_version=4) if out.is_file() else None
    return executed


def text_outputs(nb: nbformat.NotebookNode) -> str:
    """All stream and text outputs of a notebook, joined."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                parts.append(output.data.get("text/markdown", output.data.get("text/plain", "")))
    return "\n".join(parts)


def error_output(path: Path) -> tuple[int, dict]:
    """The index of the failed cell and its error output."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                return index, output
    raise AssertionError(f"no error output in {path}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder made by 00_quickstart with tiny parameters, and the folder of executed notebooks."""
    folder = tmp_path_factory.mktemp("notebooks")
    run_dir = folder / "run"
    nb = execute("00_quickstart", folder, run_dir=str(run_dir), overrides=TINY, figures_dir=str(folder / "figures"))
    return {"folder": folder, "run_dir": run_dir, "quickstart": nb}


def common(tiny_run) -> dict:
    return {"run_dir": str(tiny_run["run_dir"]), "overrides": TINY, "figures_dir": str(tiny_run["folder"] / "figures")}


def test_quickstart_runs_every_stage_and_shows_the_table(tiny_run):
    text = text_outputs(tiny_run["quickstart"])
    assert "digits: 10 classes, 1437 train / 360 test images, 1x8x8" in text
    for method in ("random", "sre2l", "sre2l++", "cvdd"):
        assert f"| {method} | resnet18 |" in text
    metrics = json.loads((tiny_run["run_dir"] / "metrics.json").read_text())
    assert {r["method"] for r in metrics["results"]} == {"random", "sre2l", "sre2l++", "cvdd"}
    assert "image shape: (1, 8, 8) classes: 10" in text
    assert (tiny_run["folder"] / "figures" / "quickstart_cvdd_images.png").is_file()


@pytest.mark.parametrize("name", ["01_committee", "02_prior_performance", "03_synthesis", "04_soft_labels_bssl",
                                  "05_post_evaluation", "06_analysis", "08_ablation"])
def test_stage_notebook_saves_its_figures(tiny_run, name, tmp_path):
    figures = tmp_path / "figures"
    params = {**common(tiny_run), "figures_dir": str(figures), **EXTRA.get(name, {})}
    nb = execute(name, tmp_path, **params)
    saved = sorted(p.stem for p in figures.glob("*.png"))
    assert saved == sorted(FIGURES[name])
    for path in figures.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))


def test_post_evaluation_trains_the_cross_architecture_students(tiny_run, tmp_path):
    execute("05_post_evaluation", tmp_path, **common(tiny_run), **EXTRA["05_post_evaluation"])
    for method in ("sre2l++", "cvdd"):
        saved = json.loads((tiny_run["run_dir"] / "eval" / method / "mobilenet_v2-soft-seed0.json").read_text())
        assert saved["student"] == "mobilenet_v2"
        assert saved["label_mode"] == "soft"


def test_ablation_rows_carry_the_setting_and_share_the_committee(tiny_run, tmp_path):
    execute("08_ablation", tmp_path, **common(tiny_run), **EXTRA["08_ablation"])
    folder = tiny_run["run_dir"] / "ablations" / "temperature"
    metrics = json.loads((folder / "metrics.json").read_text())
    cvdd_soft = {r["temperature"]: r for r in metrics["results"] if r["method"] == "cvdd" and r["label_mode"] == "soft"}
    assert sorted(cvdd_soft) == [1.0, 50.0]
    assert cvdd_soft[1.0]["variant"] == "T1"
    # The variants start from the base run's checkpoints (hard links), so no member was retrained.
    for member in MEMBERS:
        base = (tiny_run["run_dir"] / "committee" / f"{member}.pt").stat()
        variant = (folder / "T1" / "committee" / f"{member}.pt").stat()
        assert variant.st_ino == base.st_ino
    # Each variant's soft-label teachers are weighted by softmax(alpha / T) with its own T.
    weights = {t: json.loads((folder / v / "eval" / "cvdd" / "resnet18-soft-seed0.json").read_text())
               ["protocol"]["teacher_weights"] for t, v in ((1.0, "T1"), (50.0, "T50"))}
    priors = json.loads((tiny_run["run_dir"] / "priors.json").read_text())["alpha"]
    for t, found in weights.items():
        expected = [math.exp(priors[m] / t) for m in MEMBERS]
        assert found == pytest.approx([e / sum(expected) for e in expected], abs=1e-6)


def test_variant_reuses_contained_variant_member(tiny_run):
    """A variant that adds an override to another one links that variant's retrained members."""
    from cvdd.session import open_run
    from cvdd.sweep import run_variants

    session = open_run("configs/digits.yaml", TINY, run_dir=tiny_run["run_dir"])
    retrain = {"committee.train": {"resnet18": {"augment": False, "epochs": 1}}}
    variants = {"copy": retrain, "copy-equal": {**retrain, "synthesis.voter": "equal"}}
    metrics = run_variants(session, "contained", variants, {"methods": ["cvdd"], "evaluate.seeds": [0]})

    folder = tiny_run["run_dir"] / "ablations" / "contained"
    base = (tiny_run["run_dir"] / "committee" / "resnet18.pt").stat()
    copy = (folder / "copy" / "committee" / "resnet18.pt").stat()
    copy_equal = (folder / "copy-equal" / "committee" / "resnet18.pt").stat()
    assert copy.st_ino != base.st_ino
    assert copy_equal.st_ino == copy.st_ino
    # The lines of the base run's log after "variant copy-equal:" are that variant's. Its linked
    # checkpoint matched the config, so resnet18 was not trained again.
    log = (tiny_run["run_dir"] / "run.log").read_text().rpartition("variant copy-equal:")[2]
    resnet18_lines = [line for line in log.splitlines() if "member resnet18: checkpoint" in line]
    assert resnet18_lines
    assert all("matches the config, skipped" in line for line in resnet18_lines)
    assert "member resnet18: test top-1" not in log
    assert metrics["variant_priors"]["copy-equal"] == metrics["variant_priors"]["copy"]
    assert {r["variant"] for r in metrics["results"]} == {"copy", "copy-equal"}


def _printed_weights(nb) -> dict[str, float]:
    weights = {}
    for line in text_outputs(nb).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in MEMBERS and "." in parts[1] and float(parts[1]) <= 1.0:
            weights[parts[0]] = float(parts[1])
    return weights


def test_injected_temperature_changes_the_weights(tiny_run, tmp_path):
    priors = {"resnet18": 80.0, "mobilenet_v2": 60.0}
    overrides = {**TINY, "prior.values": priors}
    found = {}
    for temperature in (1.0, 50.0):
        nb = execute("02_prior_performance", tmp_path, **{**common(tiny_run), "overrides": overrides},
                     temperature=temperature)
        found[temperature] = _printed_weights(nb)
        # softmax(alpha / T) by hand: exp(80/T) / (exp(80/T) + exp(60/T)).
        first = 1.0 / (1.0 + math.exp((60.0 - 80.0) / temperature))
        assert found[temperature]["resnet18"] == pytest.approx(first, abs=1e-4)
        assert found[temperature]["mobilenet_v2"] == pytest.approx(1.0 - first, abs=1e-4)
    assert found[1.0]["resnet18"] > 0.99
    assert found[50.0]["resnet18"] < 0.6


@pytest.mark.parametrize("parameters, expected", [
    ({"members": ["resnet18", "resnet19"]}, "resnet19"),
    ({"temperature": 0.0}, "temperature"),
])
def test_invalid_parameter_stops_with_one_line(tiny_run, tmp_path, parameters, expected):
    params = {**common(tiny_run), **EXTRA["03_synthesis"], **parameters}
    with pytest.raises(PapermillExecutionError):
        execute("03_synthesis", tmp_path, **params)
    index, output = error_output(tmp_path / "03_synthesis.ipynb")
    nb = nbformat.read(tmp_path / "03_synthesis.ipynb", as_version=4)
    assert "SynthesisPanel(" in nb.cells[index].source
    assert output.traceback == [f"cvdd: error: {output.evalue}"]
    assert expected in output.evalue
    assert "\n" not in output.evalue
    # Nothing after the failed cell ran.
    assert all(not c.get("outputs") for c in nb.cells[index + 1:] if c.cell_type == "code")


def test_experiments_notebook_lists_experiments_and_collects_reports(tiny_run, tmp_path):
    reports = tmp_path / "reports"
    (reports / "tiny").mkdir(parents=True)
    shutil.copy(tiny_run["run_dir"] / "metrics.json", reports / "tiny" / "metrics.json")
    nb = execute("07_experiments", tmp_path, experiment="digits", execute=False, reports_dir=str(reports))
    text = text_outputs(nb)
    assert "configs/digits.yaml" in text
    assert "### tiny" in text
    assert "| cvdd | resnet18 |" in text


@pytest.mark.parametrize("name", ["00_quickstart", "03_synthesis", "06_analysis"])
def test_tutorial_passes_nbval(tiny_run, name, tmp_path):
    """nbval --nbval-lax: every cell runs, and cells marked NBVAL_CHECK_OUTPUT match the stored output."""
    copy = tmp_path / f"{name}.ipynb"
    params = {**common(tiny_run), "figures_dir": "", **EXTRA.get(name, {})}
    # prepare_only injects the parameters and keeps the stored outputs that nbval compares with.
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(copy), parameters=params, prepare_only=True)
    stored = [c for c in nbformat.read(copy, as_version=4).cells if "NBVAL_CHECK_OUTPUT" in c.source]
    assert stored and all(c.outputs for c in stored), "the committed notebook lacks the outputs nbval checks"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval-sanitize.cfg"), str(copy)],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "CVDD_NO_PROGRESS": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def _report_experiment(path: Path, tiny_run, notebooks: list[str], overrides: dict, **extra) -> Path:
    path.write_text(json.dumps({
        "description": "two notebooks on the tiny quickstart run",
        "config": str(ROOT / "configs" / "digits.yaml"), "run_dir": str(tiny_run["run_dir"]),
        "overrides": overrides, "notebooks": notebooks,
        "paper_priors": {"resnet18": 75.41, "mobilenet_v2": 71.37}, **extra,
    }))
    return path


def _cvdd(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvdd", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "CVDD_NO_PROGRESS": "1"}, timeout=600)


def test_report_tables_match_metrics(tiny_run, tmp_path):
    experiment = _report_experiment(tmp_path / "tiny.yaml", tiny_run, ["01_committee", "02_prior_performance"], TINY)
    result = _cvdd("report", str(experiment), "--reports-dir", str(tmp_path / "reports"), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "reports" / "tiny"
    assert sorted(p.name for p in report.glob("*.ipynb")) == ["01_committee.ipynb", "02_prior_performance.ipynb"]
    assert sorted(p.name for p in (report / "figures").glob("*.png")) == ["committee_accuracy.png",
                                                                         "weights_vs_temperature.png"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["results"] == json.loads((tiny_run["run_dir"] / "metrics.json").read_text())["results"]
    results = (report / "results.md").read_text()
    for row in metrics["results"]:
        cell = f"{100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}"
        line = next(x for x in results.splitlines() if x.startswith(f"| {row['method']} | {row['student']} |"))
        assert cell in line, (row, line)
    for member, alpha in metrics["priors"].items():
        assert f"| {member} | {alpha:.2f} | " in results
    assert "75.41" in results
    assert "![weights_vs_temperature](figures/weights_vs_temperature.png)" in results
    assert not list(report.parent.glob("*.tmp-*"))

    # A hand-written reading is placed into results.md without executing the notebooks again.
    (report / "discussion.md").write_text("## Reading\n\nThe tiny run shows the pipeline only.\n")
    notebook_bytes = (report / "01_committee.ipynb").read_bytes()
    result = _cvdd("report", str(experiment), "--reports-dir", str(tmp_path / "reports"), "--tables-only", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rewritten = (report / "results.md").read_text()
    assert "The tiny run shows the pipeline only." in rewritten
    assert rewritten.replace("## Reading\n\nThe tiny run shows the pipeline only.\n\n", "") == results
    assert (report / "01_committee.ipynb").read_bytes() == notebook_bytes


def test_failed_report_leaves_the_previous_report_unchanged(tiny_run, tmp_path):
    """Also places the report in the folder that report_folder names, as the parts of a study do."""
    reports = tmp_path / "reports"
    folder = {"report_folder": "study/tiny"}
    # A killed run's staging folder is removed. One whose process still runs is kept.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed = reports / "study" / f"tiny.tmp-{ended.pid}"
    running = reports / "study" / f"tiny.tmp-{os.getpid()}"
    for staging in (killed, running):
        (staging / "figures").mkdir(parents=True)
    good = _report_experiment(tmp_path / "tiny.yaml", tiny_run, ["01_committee"], TINY, **folder)
    assert _cvdd("report", str(good), "--reports-dir", str(reports), cwd=ROOT).returncode == 0
    assert not killed.exists()
    assert running.is_dir()
    shutil.rmtree(running)
    assert (reports / "study" / "tiny" / "01_committee.ipynb").is_file()
    assert not (reports / "tiny").exists()
    assert "### study/tiny" in collect_reports(reports)
    before = {p: p.read_bytes() for p in (reports / "study" / "tiny").rglob("*") if p.is_file()}
    broken = _report_experiment(tmp_path / "tiny.yaml", tiny_run, ["01_committee"], {**TINY, "synthesis.experts": 0},
                                **folder)
    result = _cvdd("report", str(broken), "--reports-dir", str(reports), cwd=ROOT)
    assert result.returncode == 2
    error_lines = [x for x in result.stderr.splitlines() if x.startswith("cvdd: error:")]
    assert len(error_lines) == 1
    assert "01_committee" in error_lines[0]
    assert "synthesis.experts" in error_lines[0]
    after = {p: p.read_bytes() for p in (reports / "study" / "tiny").rglob("*") if p.is_file()}
    assert after == before
    # The failed notebook's executed copy stays beside the report, for inspection.
    assert (reports / "study" / "tiny.failed" / "01_committee.ipynb").is_file()
    assert str(reports / "study" / "tiny.failed" / "01_committee.ipynb") in error_lines[0]
    assert not list((reports / "study").glob("tiny.tmp-*"))


def test_unknown_experiment_is_a_one_line_error(tmp_path):
    result = _cvdd("report", "no-such-experiment", "--reports-dir", str(tmp_path), cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cvdd: error: experiment 'no-such-experiment' not found")
    assert "digits" in result.stderr
    assert not list(tmp_path.iterdir())
