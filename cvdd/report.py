"""Reports: execute an experiment's notebooks with papermill into reports/<experiment>/ (`cvdd report`).

An experiment file in configs/experiments/ names a config, a run folder, config overrides
and the notebooks to execute, with per-notebook parameters:

    name: digits
    description: the embedded demo, every notebook
    config: configs/digits.yaml
    run_dir: runs/digits
    overrides: {}
    notebooks: [00_quickstart, 01_committee, ...]
    parameters: {03_synthesis: {ipc: 2}}
    paper_priors: {}          # optional: the paper's Table 15 column, shown next to the priors
    metrics_file: metrics.json  # optional: which metrics.json of the run folder the report copies
    paper_results: {}         # optional: {variant or "main": {method: the paper's top-1 in %, or {student: %}}}
    paper_source: ""          # optional: where paper_results come from (table, dataset, scale)

The notebooks run in a staging folder; only when all of them succeed are the executed
notebooks, figures, metrics.json and results.md moved into the report folder, so a failed
run leaves the previous report as it was. A failed run's executed notebooks go to
<report>.failed/ for inspection. A staging folder left by a killed run is removed when the
next run of the same report starts. The stages themselves reuse finished work in the
run folder, so running a report again continues where a cut-short run stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from .progress import tqdm

from .errors import ConfigError, CvddError
from .runs import atomic_write_json, atomic_write_text, read_json
from .session import override_list, project_path, project_root

log = logging.getLogger(__name__)

EXPERIMENT_KEYS = {"name", "description", "config", "run_dir", "overrides", "notebooks", "parameters",
                   "paper_priors", "paper_note", "metrics_file", "paper_results", "paper_source", "report_folder"}


@dataclass
class Experiment:
    """One batch of notebooks over one run folder."""

    name: str
    config: str
    notebooks: list[str]
    run_dir: str | None = None
    description: str = ""
    overrides: dict = field(default_factory=dict)
    parameters: dict[str, dict] = field(default_factory=dict)
    paper_priors: dict[str, float] = field(default_factory=dict)
    paper_note: str = ""
    # The metrics.json the report copies, relative to the run folder (ablations write their own).
    metrics_file: str = "metrics.json"
    # The paper's top-1 (%) for the same rows: {variant: {method: value or {student: value}}}.
    # The variant "main" names a run without variants.
    paper_results: dict[str, dict[str, float | dict[str, float]]] = field(default_factory=dict)
    paper_source: str = ""
    # The report's folder under reports/, when not the experiment's name (parts of one study
    # share a parent: fidelity-cifar10/table1).
    report_folder: str = ""
    path: str = ""

    @property
    def folder(self) -> str:
        return self.report_folder or self.name


def experiments_dir() -> Path:
    return project_path("configs/experiments")


def notebooks_dir() -> Path:
    return project_path("notebooks")


def list_experiments() -> list[str]:
    """Names of the experiment files in configs/experiments/."""
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def list_studies() -> list[str]:
    """List the studies: the parent folders that the experiments' report_folder values share."""
    return sorted({spec.folder.split("/")[0] for spec in map(load_experiment, list_experiments()) if "/" in spec.folder})


def load_experiment(name: str | Path) -> Experiment:
    """Read and check an experiment file, by name (configs/experiments/NAME.yaml) or by path."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = experiments_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"experiment {str(name)!r} not found; choose one of {list_experiments()}, "
                          f"a study of parts {list_studies()}, or pass a YAML path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment file {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {str(path)!r} must hold a mapping")
    unknown = sorted(set(data) - EXPERIMENT_KEYS)
    if unknown:
        raise ConfigError(f"experiment file {str(path)!r} has unknown key(s) {unknown}; allowed: {sorted(EXPERIMENT_KEYS)}")
    for key in ("config", "notebooks"):
        if key not in data:
            raise ConfigError(f"experiment file {str(path)!r} has no {key!r}; add it")
    spec = Experiment(**{"name": path.stem, **data, "path": str(path)})
    missing = [n for n in spec.notebooks if not (notebooks_dir() / f"{n}.ipynb").is_file()]
    if missing:
        available = sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))
        raise ConfigError(f"experiment {spec.name!r} lists notebook(s) {missing} that do not exist; choose from {available}")
    strays = sorted(set(spec.parameters) - set(spec.notebooks))
    if strays:
        raise ConfigError(f"experiment {spec.name!r} has parameters for {strays}, which it does not run; "
                          f"add them to notebooks or remove the parameters")
    return spec


def notebook_parameters(spec: Experiment, notebook: str, figures_dir: Path) -> dict:
    params = {"config": spec.config, "overrides": dict(spec.overrides), "figures_dir": str(figures_dir)}
    if spec.run_dir:
        params["run_dir"] = spec.run_dir
    params.update(spec.parameters.get(notebook, {}))
    return params


def run_report(name: str | Path, reports_dir: str | Path = "reports", kernel_name: str | None = None) -> Path:
    """Execute the experiment's notebooks into `reports_dir`/<name>/ and write results.md.

    Returns the report folder. A failing notebook raises CvddError naming the notebook, the
    cell and the error; its executed copy stays in the staging folder for inspection.
    """
    spec = load_experiment(name)
    try:
        import papermill
        from papermill.exceptions import PapermillExecutionError
    except ImportError:
        raise CvddError("papermill is not installed in this environment; run `make install-dev` for the "
                        "notebook extras, or use `make report EXPERIMENT=NAME`, which installs them") from None
    root = project_root() or Path.cwd()
    out = project_path(reports_dir) / spec.folder
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
    staging = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    figures = staging / "figures"
    figures.mkdir(parents=True)
    seconds: dict[str, float] = {}
    for notebook in tqdm(spec.notebooks, desc=f"report {spec.name}", unit="notebook"):
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebooks_dir() / f"{notebook}.ipynb"), str(staging / f"{notebook}.ipynb"),
                parameters=notebook_parameters(spec, notebook, figures), cwd=str(root),
                kernel_name=kernel_name, progress_bar=False, log_output=False,
            )
        except PapermillExecutionError as exc:
            failed = out.parent / f"{out.name}.failed"
            if failed.exists():
                shutil.rmtree(failed)
            os.replace(staging, failed)
            raise CvddError(
                f"notebook {notebook} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue.splitlines()[0] if exc.evalue else ''}; "
                f"its executed copy is {str(failed / (notebook + '.ipynb'))!r}; the report in {str(out)!r} is unchanged"
            ) from None
        seconds[notebook] = time.perf_counter() - start
        log.info("report %s: %s executed in %.1f s", spec.name, notebook, seconds[notebook])

    metrics = _run_metrics(spec)
    if metrics is not None:
        metrics["notebook_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        atomic_write_json(staging / "metrics.json", metrics)
    notes = out / "discussion.md"
    text = results_markdown(spec, metrics, sorted(figures.glob("*.png")), seconds,
                            notes.read_text() if notes.is_file() else "")
    atomic_write_text(staging / "results.md", text)
    _move_into(staging, out)
    return out


def rewrite_results(name: str | Path, reports_dir: str | Path = "reports") -> Path:
    """Rebuild results.md of an existing report from its metrics.json, figures and discussion.md.

    Executes no notebook: use it after editing discussion.md or the experiment's paper numbers.
    """
    spec = load_experiment(name)
    out = project_path(reports_dir) / spec.folder
    if not (out / "metrics.json").is_file():
        raise CvddError(f"no metrics.json in {str(out)!r}; run `cvdd report {spec.name}` first")
    metrics = read_json(out / "metrics.json")
    notes = out / "discussion.md"
    text = results_markdown(spec, metrics, sorted((out / "figures").glob("*.png")),
                            metrics.get("notebook_seconds", {}), notes.read_text() if notes.is_file() else "")
    atomic_write_text(out / "results.md", text)
    return out / "results.md"


def _run_metrics(spec: Experiment) -> dict | None:
    """Read the run folder's metrics.json, if the experiment's notebooks produced one."""
    from .config import load_config

    cfg = load_config(project_path(spec.config), override_list(spec.overrides))
    run_dir = project_path(spec.run_dir) if spec.run_dir else project_path(cfg.resolved_run_dir())
    path = Path(run_dir) / spec.metrics_file
    return read_json(path) if path.is_file() else None


def _remove_abandoned_staging(out: Path) -> None:
    """Remove the staging folders of `out` whose process no longer runs (a killed report run)."""
    for staging in out.parent.glob(f"{out.name}.tmp-*"):
        pid = staging.name.rpartition(".tmp-")[2]
        if staging.is_dir() and pid.isdigit() and not _process_is_running(int(pid)):
            log.info("removing %s, the staging folder of a report run that was killed", staging)
            shutil.rmtree(staging)


def _process_is_running(pid: int) -> bool:
    """Return whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # The process exists but belongs to another user.
    return True


def _move_into(staging: Path, out: Path) -> None:
    """Move every file of `staging` into `out` (one rename each), keeping files only `out` has."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging)


def results_markdown(spec: Experiment, metrics: dict | None, figures: list[Path], seconds: dict[str, float],
                     discussion: str = "") -> str:
    """Write results.md: the tables of metrics.json, the priors, times, memory and figures.

    `discussion` is the report folder's hand-written discussion.md (the reading of the
    numbers), placed after the tables; it is kept when the report is regenerated.
    """
    from .pipeline import format_results

    lines = [f"# Report `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Regenerate with `cvdd report {spec.name}` (or `make report EXPERIMENT={spec.name}`). "
              f"Config `{spec.config}`" + (f" with overrides `{spec.overrides}`" if spec.overrides else "") +
              f"; run folder `{spec.run_dir or 'runs/<name>'}`. Every number below is read from `metrics.json` "
              "in this folder.", ""]
    if metrics is None:
        lines += ["No metrics.json: the notebooks of this experiment do not run the main job.", ""]
    else:
        lines += ["## Results", "", format_results(metrics).split("\n", 1)[1].rsplit("\npriors", 1)[0], "",
                  "Final-epoch test top-1 in percent, mean ± sample standard deviation over seeds "
                  f"{_seeds(metrics)}.", ""]
        lines += _paper_section(spec, metrics)
        lines += _fair_section(metrics)
        lines += _priors_section(spec, metrics)
        lines += _time_section(metrics)
    if discussion:
        lines += [discussion.strip(), ""]
    lines += ["## Notebooks", "", "| notebook | seconds to execute |", "|---|---|"]
    lines += [f"| [{n}]({n}.ipynb) | {s:.1f} |" for n, s in seconds.items()]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def _time_section(metrics: dict) -> list[str]:
    """Seconds and peak memory per stage: the longest of the runs that produced these results.

    A rerun reuses finished work and takes seconds, so the longest run of a stage is the one
    that did its work.
    """
    history = metrics.get("stage_history") or [{"stage_seconds": metrics.get("stage_seconds", {}),
                                                "stage_peak_rss_bytes": metrics.get("stage_peak_rss_bytes", {})}]
    lines = ["## Time and memory", "", "| stage | seconds | peak RSS (GiB) |", "|---|---|---|"]
    for stage_name in metrics.get("stage_seconds", {}):
        entries = [h for h in history if stage_name in h["stage_seconds"]]
        longest = max(entries, key=lambda h: h["stage_seconds"][stage_name])
        peak = longest["stage_peak_rss_bytes"].get(stage_name)
        cell = f"{peak / 2**30:.2f}" if peak else "-"
        lines.append(f"| {stage_name} | {longest['stage_seconds'][stage_name]:.1f} | {cell} |")
    lines += ["", f"Per stage, the longest of the {len(history)} run(s) that produced these results, which is "
              "the run that did the stage's work; the peak RSS is the process's peak up to the end of the stage.",
              ""]
    return lines


def _seeds(metrics: dict) -> str:
    seeds = sorted({s for row in metrics.get("results", []) for s in row.get("seeds", [])})
    return str(seeds)


def _paper_section(spec: Experiment, metrics: dict) -> list[str]:
    """List our soft-label top-1 next to the paper's (Cui et al.) for the rows the experiment file names.

    A method's paper value is one number, or {student: number} for a part that trains several
    student architectures. Then the table gains a student column.
    """
    if not spec.paper_results:
        return []
    per_student = any(isinstance(value, dict) for methods in spec.paper_results.values() for value in methods.values())
    header = "| variant | method | " + ("student | " if per_student else "")
    lines = ["## Beside the paper", "", spec.paper_source.strip(), "",
             header + "here: soft top-1 (%) | paper: top-1 (%) |", "|---|---|---|---|" + ("---|" if per_student else "")]
    for variant, methods in spec.paper_results.items():
        for method, value in methods.items():
            by_student = value if isinstance(value, dict) else {None: value}
            for student, paper_value in by_student.items():
                found = [r for r in metrics.get("results", []) if r["method"] == method and r["label_mode"] == "soft"
                         and r.get("variant", "main") == variant and student in (None, r["student"])]
                measured = f"{100 * found[0]['top1_mean']:.2f} ± {100 * found[0]['top1_std']:.2f}" if found else "not run"
                student_cell = f"{student or '-'} | " if per_student else ""
                lines.append(f"| {variant} | {method} | {student_cell}{measured} | {paper_value:.1f} |")
    return lines + [""]


def _fair_section(metrics: dict) -> list[str]:
    from .metrics import fair_rows, format_fair_table

    methods = {row["method"] for row in metrics.get("results", [])}
    if "random" not in methods or len(methods) < 2:
        return []
    reference = metrics.get("real_hard") or {}
    real_hard = {student: r["top1"] for student, r in reference.items()}
    note = ("HLR uses, as acc(real, hard), the committee member of the student's architecture and width, "
            "trained with hard labels on the whole training split: "
            + ", ".join(f"{s} {100 * t:.2f}%" for s, t in real_hard.items()) + "." if real_hard else
            "HLR, alpha and LRS need acc(real, hard), which this run does not have.")
    return ["## Fair metrics", "", format_fair_table(fair_rows(metrics, real_hard=real_hard)), "", note, ""]


def _priors_section(spec: Experiment, metrics: dict) -> list[str]:
    priors = metrics.get("priors") or {}
    if not priors:
        return []
    lines = ["## Prior performance (Algorithm 1)", ""]
    # Variants that change a member (an overfitted copy, say) have their own priors, so each gets a column.
    variant_priors = list((metrics.get("variant_priors") or {}).items())
    if any(values != variant_priors[0][1] for _, values in variant_priors[1:]):
        columns = {f"alpha {name} (%)": values for name, values in variant_priors}
    else:
        columns = {"alpha here (%)" if spec.paper_priors else "alpha (%)": priors}
    members = list(dict.fromkeys(m for values in columns.values() for m in values))
    if spec.paper_priors:
        columns["paper Table 15 (%)"] = spec.paper_priors
    lines += ["| member | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for member in members:
        cells = [f"{values[member]:.2f}" if member in values else "-" for values in columns.values()]
        lines.append(f"| {member} | " + " | ".join(cells) + " |")
    if spec.paper_note:
        lines += ["", spec.paper_note.strip()]
    return lines + [""]


def study_parts(name: str) -> list[Experiment]:
    """Experiments whose report_folder lies under `name` (the parts of one study), in name order."""
    if (experiments_dir() / f"{name}.yaml").is_file() or Path(name).suffix in (".yaml", ".yml"):
        return []
    specs = [load_experiment(n) for n in list_experiments()]
    return [s for s in specs if s.folder.startswith(f"{name}/")]


# The sections of each part's results.md that the study index repeats, in this order.
STUDY_SECTIONS = ("Beside the paper", "Results", "Fair metrics", "Notebooks")


def _sections(markdown: str) -> dict[str, str]:
    """Split a results.md at its level-2 headings into {heading: body}."""
    sections: dict[str, str] = {}
    for chunk in markdown.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip()] = body.strip()
    return sections


PRIORS_SECTION = "Prior performance (Algorithm 1)"


def _study_priors(finished: dict[str, dict[str, str]]) -> list[str]:
    """Return the committee's priors for the top of the study index.

    Every part shares the base run's committee, so one table serves the study. It is the
    first table with the paper's Table 15 column, or else the first table found.
    """
    tables = [sections[PRIORS_SECTION] for sections in finished.values() if PRIORS_SECTION in sections]
    if not tables:
        return []
    beside_paper = [t for t in tables if "paper Table 15" in t]
    return [f"## {PRIORS_SECTION}", "", (beside_paper or tables)[0], ""]


def write_study_index(name: str, reports_dir: str | Path = "reports") -> Path:
    """Write reports/<name>/results.md from the results.md of every part of the study.

    The index copies each part's tables, so its numbers are those of the parts' metrics.json
    files. The study's own discussion.md (the reading across parts) comes first.
    """
    parts = study_parts(name)
    if not parts:
        raise ConfigError(f"no experiment has a report_folder under {name!r}; "
                          f"choose an experiment from {list_experiments()}")
    out = project_path(reports_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Study `{name}`", "",
             f"{len(parts)} parts, each an experiment file in `configs/experiments/` with its own report folder. "
             f"`cvdd report {name}` runs every part (each resumes where it stopped) and rewrites this file; "
             f"`cvdd report {name} --tables-only` rewrites the tables only. Every table below is copied from "
             "the part's results.md, which is generated from the metrics.json beside it.", ""]
    notes = out / "discussion.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    # Read each finished part's sections once. Its results.md is generated from its metrics.json.
    finished: dict[str, dict[str, str]] = {}
    for spec in parts:
        folder = project_path(reports_dir) / spec.folder
        if (folder / "results.md").is_file() and (folder / "metrics.json").is_file():
            finished[spec.name] = _sections((folder / "results.md").read_text())
    lines += _study_priors(finished)
    for spec in parts:
        relative = Path(spec.folder).relative_to(name)
        lines += [f"## Part `{spec.name}`", "", spec.description.strip(), "",
                  f"Command: `cvdd report {spec.name}`. Report: [{relative}/results.md]({relative}/results.md).", ""]
        if spec.name not in finished:
            lines += ["Not run yet.", ""]
            continue
        for title in STUDY_SECTIONS:
            if title in finished[spec.name]:
                body = finished[spec.name][title].replace("](", f"]({relative}/").replace(f"]({relative}/http", "](http")
                lines += [f"### {title}", "", body, ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    return out / "results.md"


def collect_reports(reports_dir: str | Path = "reports") -> str:
    """Collect the results tables of every report folder that contains a metrics.json, as Markdown."""
    from .pipeline import format_results

    folder = project_path(reports_dir)
    sections = []
    for path in sorted(folder.glob("**/metrics.json")):
        sections += [f"### {path.parent.relative_to(folder)}", "", format_results(read_json(path)), ""]
    if not sections:
        return f"No report with a metrics.json in {str(folder)!r} yet; run `cvdd report NAME`."
    return "\n".join(sections)
