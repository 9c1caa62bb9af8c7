"""Ablations: the same pipeline under several config variants, collected into one metrics.json.

Each variant is a set of config overrides, for example {"synthesis.temperature": 1}. An
ablation named A runs each variant V in its own run folder, <run>/ablations/A/V/, which
starts from the base run's committee checkpoints and priors.json, and from the files of any
earlier variant whose overrides are all among V's. The stages reuse them when the variant
did not change what they were made with, and recompute them otherwise. The
combined rows go to <run>/ablations/A/metrics.json, so the base run's own results stay.
The rows of every variant carry the varied settings as keys ("temperature": 1,
"voter": "equal", "committee": [...]), as metrics.json's ablation rows do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from .config import apply_override, config_from_dict, config_to_dict, config_to_yaml
from .errors import ConfigError
from .progress import tqdm
from .runs import RunFolder, atomic_write_json, peak_rss_bytes
from .session import Session, override_list

log = logging.getLogger(__name__)

# Setting keys of metrics.json rows for override paths whose last part reads badly alone.
SETTING_NAMES = {"committee.members": "committee", "committee.train": "member_train", "evaluate.bssl": "bssl", "synthesis.experts": "experts",
                 "synthesis.temperature": "temperature", "synthesis.voter": "voter"}


def setting_of(overrides: Mapping[str, object]) -> dict:
    """Return the row keys of a variant: {"synthesis.temperature": 1} -> {"temperature": 1}."""
    return {SETTING_NAMES.get(path, path.rsplit(".", 1)[-1]): value for path, value in overrides.items()}


def _share(source: Path, target: Path) -> None:
    """Give `target` the file `source` (a hard link where possible), unless it already has one.

    A variant that retrains a member writes a new file and renames it over the link, so the
    base run's checkpoint is never changed through the link.
    """
    if target.exists() or not source.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _check_folder_name(kind: str, name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{kind} name {name!r} is not a plain folder name; use letters, digits and dashes")


def _share_finished_work(base: RunFolder, variant: RunFolder, earlier: Sequence[RunFolder] = ()) -> None:
    """Link finished checkpoints, priors, distilled items and results into a variant.

    The own files of each `earlier` variant come first, then the base run's files where the
    variant still has none. Each stage checks the fingerprint of what it finds, so the
    variant reuses exactly what its settings did not change (a variant without overrides
    reuses everything) and recomputes whatever a link got wrong.
    """
    for other in earlier:
        for path in variant_own_files(base.root, other.root):
            _share(path, variant.root / path.relative_to(other.root))
    _share(base.priors_path, variant.priors_path)
    for folder in ("committee", "prior", "distilled", "eval"):
        for path in sorted((base.root / folder).rglob("*")):
            if path.is_file() and ".partial" not in path.name:
                _share(path, variant.root / path.relative_to(base.root))


# Folders of files that a run makes again from its other files or that are too large to commit:
# the PNG copies of a distilled set and the stored soft labels.
DERIVED_FOLDERS = ("png", "labels")


def variant_own_files(base_root: str | Path, variant_root: str | Path) -> list[Path]:
    """List the files of a variant folder whose bytes differ from the base run's file at the same path.

    The other files are the base run's, shared into the variant, and `run_variants` links them
    in again when they are missing. A committed study therefore needs only the listed files.
    Files under DERIVED_FOLDERS and unfinished files (.partial, .tmp-) are left out.
    """
    import filecmp

    base_root, variant_root = Path(base_root), Path(variant_root)
    own = []
    for path in sorted(variant_root.rglob("*")):
        if not path.is_file() or ".partial" in path.name or ".tmp-" in path.name:
            continue
        if any(part in DERIVED_FOLDERS for part in path.relative_to(variant_root).parts[:-1]):
            continue
        twin = base_root / path.relative_to(variant_root)
        if not (twin.is_file() and filecmp.cmp(path, twin, shallow=False)):
            own.append(path)
    return own


def _contained_variants(name: str, variants: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Name the variants before `name` whose overrides are all among its own, most overrides first
    (ties in the order of `variants`).

    Such a variant made files that `name` can reuse and the base run cannot give it: a member
    retrained with the same recipe, say, when `name` also changes the voter.
    """
    def assignments(overrides: Mapping[str, object]) -> set[str]:
        return {f"{key}={json.dumps(value, sort_keys=True)}" for key, value in overrides.items()}

    own = assignments(variants[name])
    earlier = list(variants)[:list(variants).index(name)]
    contained = [other for other in earlier if variants[other] and assignments(variants[other]) <= own]
    return sorted(contained, key=lambda other: -len(variants[other]))


def ablation_folder(base: Session, ablation: str) -> Path:
    _check_folder_name("ablation", ablation)
    return base.run.root / "ablations" / ablation


def variant_session(base: Session, ablation: str, name: str, overrides: Mapping[str, object],
                    shared: Mapping[str, object] | None = None) -> Session:
    """Build the session of one variant: base config plus `overrides`, in <run>/ablations/<ablation>/<name>/."""
    from .session import check_stage_inputs

    _check_folder_name("variant", name)
    data = config_to_dict(base.cfg)
    for assignment in override_list({**(shared or {}), **overrides}):
        apply_override(data, assignment)
    run = RunFolder(ablation_folder(base, ablation) / name)
    data["run_dir"] = str(run.root)
    cfg = config_from_dict(data)
    check_stage_inputs(cfg, base.dataset)
    return Session(cfg, base.dataset, run, base.device)


def run_variants(base: Session, ablation: str, variants: Mapping[str, Mapping[str, object]],
                 shared: Mapping[str, object] | None = None) -> dict:
    """Run the pipeline for every variant and return the combined metrics (metrics.json's shape).

    Args:
        base: the opened run whose committee and priors the variants start from.
        ablation: the ablation's name, its folder under <run>/ablations/.
        variants: variant name -> config overrides.
        shared: overrides applied to every variant first (for example the methods to run),
            which leave the base run's own config as it is.

    Every variant is checked before any of them runs, so a bad one fails before hours of
    work. The base run's committee is trained first if it is missing, once for all variants.
    """
    from .pipeline import real_hard_reference, run_pipeline
    from .runs import atomic_write_text

    if not variants:
        raise ConfigError("no variants given; pass {name: {config.key: value}} for at least one variant")
    sessions = {name: variant_session(base, ablation, name, overrides, shared) for name, overrides in variants.items()}
    base.train_committee()
    if any(m in ("cvdd", "random") for m in base.cfg.methods):
        base.priors()
    rows, stage_seconds, priors, real_hard = [], {}, {}, {}
    for name, session in tqdm(sessions.items(), desc="variants", unit="variant"):
        session.run.create()
        _share_finished_work(base.run, session.run, [sessions[other].run for other in _contained_variants(name, variants)])
        atomic_write_text(session.run.config_path, config_to_yaml(session.cfg))
        log.info("variant %s: %s", name, dict(variants[name]))
        metrics = run_pipeline(session.cfg, session.dataset, session.run, session.device)
        setting = setting_of(variants[name])
        for row in metrics["results"]:
            rows.append({**row, "variant": name, **setting})
        stage_seconds[name] = metrics["stage_seconds"]
        # acc(real, hard) of HLR comes from the base committee, which every variant is compared with.
        real_hard.update(real_hard_reference(session.cfg, base.run))
        priors[name] = metrics["priors"]
    combined = {
        "dataset": base.dataset.name, "ipc": base.cfg.synthesis.ipc, "results": rows,
        "priors": next(iter(priors.values())), "variants": {n: dict(v) for n, v in variants.items()}, "shared": dict(shared or {}),
        "variant_priors": priors, "real_hard": real_hard, "std": "sample standard deviation over seeds (ddof=1)",
        "stage_seconds": {k: round(sum(v.get(k, 0.0) for v in stage_seconds.values()), 1)
                          for k in ("committee", "prior", "synthesis", "evaluate")},
        "variant_stage_seconds": stage_seconds, "peak_rss_bytes": peak_rss_bytes(),
    }
    atomic_write_json(ablation_folder(base, ablation) / "metrics.json", combined)
    return combined
