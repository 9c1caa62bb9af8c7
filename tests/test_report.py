"""The study index: one results.md that repeats the tables of every part of a study."""

import json

import pytest

from cvdd.errors import ConfigError
from cvdd.report import Experiment, _paper_section, _priors_section, study_parts, write_study_index

PART_RESULTS = """# Report `fidelity-cifar10-table1`

## Results

| method | student | soft label | hard label |
|---|---|---|---|
| cvdd | resnet18 | 42.65 ± 0.62 | 35.15 ± 0.35 |

## Beside the paper

| variant | method | here: soft top-1 (%) | paper: top-1 (%) |
|---|---|---|---|
| ipc10 | cvdd | 42.65 ± 0.62 | 54.7 |

## Prior performance (Algorithm 1)

| member | alpha here (%) | paper Table 15 (%) |
|---|---|---|
| resnet18 | 34.65 | 75.41 |

## Notebooks

| notebook | seconds to execute |
|---|---|
| [08_ablation](08_ablation.ipynb) | 1561.0 |

## Figures

![curves](figures/curves.png)
"""


def test_study_parts_of_fidelity_study():
    names = [spec.name for spec in study_parts("fidelity-cifar10")]
    assert "fidelity-cifar10-table1" in names
    assert "fidelity-cifar10-crossarch" in names
    assert all(spec.folder.startswith("fidelity-cifar10/") for spec in study_parts("fidelity-cifar10"))


def test_experiment_name_is_not_a_study():
    assert study_parts("digits") == []


def test_study_index_copies_part_tables(tmp_path):
    part = tmp_path / "fidelity-cifar10" / "table1"
    part.mkdir(parents=True)
    (part / "results.md").write_text(PART_RESULTS)
    (part / "metrics.json").write_text(json.dumps({"results": []}))
    (tmp_path / "fidelity-cifar10" / "discussion.md").write_text("## Reading\n\nOrderings at CPU scale.\n")

    text = write_study_index("fidelity-cifar10", reports_dir=tmp_path).read_text()

    assert text.index("Orderings at CPU scale.") < text.index("## Part `fidelity-cifar10-table1`")
    assert "| cvdd | resnet18 | 42.65 ± 0.62 | 35.15 ± 0.35 |" in text
    assert "| ipc10 | cvdd | 42.65 ± 0.62 | 54.7 |" in text
    assert "| resnet18 | 34.65 | 75.41 |" in text
    # Links point into the part's folder; figures stay in the part's own report.
    assert "[08_ablation](table1/08_ablation.ipynb)" in text
    assert "curves.png" not in text
    # A part without a report yet is listed with its command.
    crossarch = text.split("## Part `fidelity-cifar10-crossarch`")[1].split("## Part")[0]
    assert "Command: `cvdd report fidelity-cifar10-crossarch`" in crossarch
    assert "Not run yet." in crossarch


def test_unknown_study_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no experiment has a report_folder under 'nothing'"):
        write_study_index("nothing", reports_dir=tmp_path)


def test_study_index_paper_priors_first(tmp_path):
    study = tmp_path / "fidelity-cifar10"
    # The bssl part comes first in name order and has no paper column; table1 has one.
    plain = PART_RESULTS.replace("| member | alpha here (%) | paper Table 15 (%) |\n|---|---|---|\n"
                                 "| resnet18 | 34.65 | 75.41 |", "| member | alpha (%) |\n|---|---|\n| resnet18 | 34.65 |")
    for folder, text in (("bssl", plain), ("table1", PART_RESULTS)):
        (study / folder).mkdir(parents=True)
        (study / folder / "results.md").write_text(text)
        (study / folder / "metrics.json").write_text(json.dumps({"results": []}))

    text = write_study_index("fidelity-cifar10", reports_dir=tmp_path).read_text()

    assert text.count("Prior performance (Algorithm 1)") == 1
    assert text.index("| resnet18 | 34.65 | 75.41 |") < text.index("## Part `fidelity-cifar10-bssl`")
    assert "| resnet18 | 34.65 |\n" not in text


def _soft_row(method, student, per_seed):
    return {"method": method, "student": student, "variant": "students", "label_mode": "soft",
            "top1_mean": sum(per_seed) / len(per_seed), "top1_std": 0.01, "top1_per_seed": per_seed}


def test_paper_table_per_student():
    spec = Experiment(name="crossarch", config="configs/cifar10-cpu.yaml", notebooks=[],
                      paper_source="Paper Table 6.",
                      paper_results={"students": {"cvdd": {"resnet18": 49.5, "densenet121": 54.7}}})
    metrics = {"results": [_soft_row("cvdd", "densenet121", [0.42, 0.44]), _soft_row("cvdd", "resnet18", [0.40, 0.41])]}

    lines = _paper_section(spec, metrics)

    assert lines[4:] == ["| variant | method | student | here: soft top-1 (%) | paper: top-1 (%) |",
                         "|---|---|---|---|---|",
                         "| students | cvdd | resnet18 | 40.50 ± 1.00 | 49.5 |",
                         "| students | cvdd | densenet121 | 43.00 ± 1.00 | 54.7 |",
                         ""]


def test_paper_table_one_value_per_method():
    spec = Experiment(name="table1", config="configs/cifar10-cpu.yaml", notebooks=[],
                      paper_source="Paper Table 1.", paper_results={"students": {"cvdd": 54.7}})
    metrics = {"results": [_soft_row("cvdd", "resnet18", [0.40, 0.41])]}

    lines = _paper_section(spec, metrics)

    assert lines[4:] == ["| variant | method | here: soft top-1 (%) | paper: top-1 (%) |",
                         "|---|---|---|---|",
                         "| students | cvdd | 40.50 ± 1.00 | 54.7 |",
                         ""]


def test_priors_table_per_variant():
    spec = Experiment(name="overfit", config="configs/cifar10-cpu.yaml", notebooks=[])
    base = {"resnet18": 35.82, "shufflenet_v2": 39.65}
    metrics = {"priors": base, "variant_priors": {"base": base, "overfit": {"resnet18": 35.82, "shufflenet_v2": 30.51}}}

    lines = _priors_section(spec, metrics)

    assert lines[2:6] == ["| member | alpha base (%) | alpha overfit (%) |", "|---|---|---|",
                          "| resnet18 | 35.82 | 35.82 |", "| shufflenet_v2 | 39.65 | 30.51 |"]


def test_priors_table_shared_by_variants():
    spec = Experiment(name="temperature", config="configs/cifar10-cpu.yaml", notebooks=[],
                      paper_priors={"resnet18": 75.41})
    priors = {"resnet18": 35.82}
    metrics = {"priors": priors, "variant_priors": {"T1": priors, "T5": dict(priors)}}

    lines = _priors_section(spec, metrics)

    assert lines[2:5] == ["| member | alpha here (%) | paper Table 15 (%) |", "|---|---|---|",
                          "| resnet18 | 35.82 | 75.41 |"]


def test_unknown_experiment_lists_studies():
    from cvdd.report import load_experiment

    with pytest.raises(ConfigError, match=r"a study of parts \['fidelity-cifar10'\]"):
        load_experiment("nosuch")


def test_report_without_papermill(monkeypatch, tmp_path):
    import sys

    from cvdd.errors import CvddError
    from cvdd.report import run_report

    # A None entry makes `import papermill` raise ImportError, as in an install without the dev extras.
    monkeypatch.setitem(sys.modules, "papermill", None)
    with pytest.raises(CvddError, match="papermill is not installed") as caught:
        run_report("digits", reports_dir=tmp_path)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_before_papermill(monkeypatch, tmp_path):
    import sys

    from cvdd.report import run_report

    monkeypatch.setitem(sys.modules, "papermill", None)
    with pytest.raises(ConfigError, match="experiment 'nosuch' not found"):
        run_report("nosuch", reports_dir=tmp_path)
