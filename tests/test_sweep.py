from cvdd.pipeline import format_results, row_setting
from cvdd.sweep import setting_of


def test_setting_of_names_rows_like_metrics_json():
    overrides = {"synthesis.temperature": 1, "committee.members": ["resnet18"], "evaluate.bssl": False,
                 "synthesis.voter": "equal", "evaluate.epochs": 50}
    assert setting_of(overrides) == {"temperature": 1, "committee": ["resnet18"], "bssl": False, "voter": "equal",
                                     "epochs": 50}


def _row(method, mode, top1, **setting):
    return {"method": method, "student": "resnet18", "ipc": 10, "label_mode": mode, "top1_mean": top1,
            "top1_std": 0.01, "top1_per_seed": [top1], "best_top1_mean": top1, "seeds": [0], **setting}


def test_format_results_adds_setting_column_for_ablation_rows():
    rows = [_row("cvdd", "soft", 0.5, variant="T1", temperature=1), _row("cvdd", "soft", 0.6, variant="T5", temperature=5)]
    text = format_results({"dataset": "digits", "ipc": 10, "results": rows})
    assert "| method | student | setting | soft label | hard label |" in text
    assert "| cvdd | resnet18 | T1 (temperature=1) | 50.00 ± 1.00 | - |" in text
    assert "| cvdd | resnet18 | T5 (temperature=5) | 60.00 ± 1.00 | - |" in text


def test_format_results_keeps_variants_apart_when_their_setting_is_a_row_key():
    """An IPC variant's override (synthesis.ipc) names a standard row key, so only the variant tells rows apart."""
    rows = [_row("cvdd", "soft", 0.25, variant="ipc1"), _row("cvdd", "soft", 0.5, variant="ipc10")]
    text = format_results({"dataset": "digits", "ipc": 10, "results": rows})
    assert "| cvdd | resnet18 | ipc1 | 25.00 ± 1.00 | - |" in text
    assert "| cvdd | resnet18 | ipc10 | 50.00 ± 1.00 | - |" in text


def test_format_results_shared_setting_line():
    rows = [_row("cvdd", "soft", 0.5, variant="students", students=["convnet"]),
            _row("random", "soft", 0.6, variant="students", students=["convnet"])]
    lines = format_results({"dataset": "digits", "ipc": 10, "results": rows}).splitlines()
    assert lines[1:] == ["| method | student | soft label | hard label |", "|---|---|---|---|",
                         "| cvdd | resnet18 | 50.00 ± 1.00 | - |", "| random | resnet18 | 60.00 ± 1.00 | - |",
                         "", "Setting of every row: students (students=['convnet'])."]


def test_format_results_plain_rows_have_no_setting_column():
    text = format_results({"dataset": "digits", "ipc": 10, "results": [_row("cvdd", "hard", 0.25)]})
    assert "| method | student | soft label | hard label |" in text
    assert "| cvdd | resnet18 | - | 25.00 ± 1.00 |" in text
    assert row_setting(_row("cvdd", "hard", 0.25)) == ""


def test_variant_own_files_skips_base_twins(tmp_path):
    import os

    from cvdd.sweep import variant_own_files

    base, variant = tmp_path / "run", tmp_path / "run" / "ablations" / "a" / "v"
    for folder in (base / "committee", variant / "committee", variant / "eval"):
        folder.mkdir(parents=True)
    (base / "committee" / "resnet18.pt").write_bytes(b"weights")
    (base / "committee" / "copied.pt").write_bytes(b"same bytes")
    (base / "priors.json").write_text('{"alpha": 1}')
    os.link(base / "committee" / "resnet18.pt", variant / "committee" / "resnet18.pt")
    (variant / "committee" / "copied.pt").write_bytes(b"same bytes")
    (variant / "priors.json").write_text('{"alpha": 2}')
    (variant / "eval" / "new.json").write_text("{}")
    (variant / "committee" / ".x.pt.tmp-12").write_bytes(b"half")
    (variant / "distilled" / "cvdd" / "png" / "cat").mkdir(parents=True)
    (variant / "distilled" / "cvdd" / "png" / "cat" / "0000.png").write_bytes(b"picture")
    (variant / "distilled" / "cvdd" / "images.pt").write_bytes(b"images")

    own = [p.relative_to(variant).as_posix() for p in variant_own_files(base, variant)]

    assert own == ["distilled/cvdd/images.pt", "eval/new.json", "priors.json"]


def test_contained_variants_only_earlier_subsets():
    from cvdd.sweep import _contained_variants

    copy = {"committee.train": {"shufflenet_v2": {"augment": False, "epochs": 15}}}
    variants = {
        "base": {},
        "equal": {"synthesis.voter": "equal"},
        "copy": copy,
        # The same nested override, its keys in another order.
        "copy-equal": {"committee.train": {"shufflenet_v2": {"epochs": 15, "augment": False}},
                       "synthesis.voter": "equal"},
        "copy-T1": {**copy, "synthesis.temperature": 1},
    }

    # Equal numbers of overrides keep the order of the experiment file.
    assert _contained_variants("copy-equal", variants) == ["equal", "copy"]
    assert _contained_variants("copy-T1", variants) == ["copy"]
    assert _contained_variants("copy", variants) == []
    assert _contained_variants("base", variants) == []
