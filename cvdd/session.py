"""One opened run: a config, its dataset, run folder and device, shared by the CLI and notebooks.

`open_run` validates everything before it writes anything, as `cvdd` does on the command
line. A notebook with a bad parameter therefore stops at that cell with the package's
one-line message, and the run folder is left as it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .config import RunConfig, config_to_yaml, load_config
from .data import ImageDataset, load_dataset
from .errors import CvddError, DataError
from .runs import RunFolder, atomic_write_text, read_json, resolve_device, setup_logging

log = logging.getLogger(__name__)


def project_root(start: str | Path | None = None) -> Path | None:
    """Return the nearest folder at or above `start` (default: the working folder) that contains configs/ and cvdd/.

    Without `start`, a working folder outside the project falls back to the project this
    package was installed from in editable mode, if any.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "configs").is_dir() and (folder / "cvdd").is_dir():
            return folder
    # An editable install: the package sits in the project (nbval runs notebooks from a copy elsewhere).
    package_parent = Path(__file__).resolve().parent.parent
    if start is None and (package_parent / "configs").is_dir():
        return package_parent
    return None


def project_path(path: str | Path) -> Path:
    """Resolve a path written relative to the project root, from any working folder.

    Notebooks run with notebooks/ as their working folder, so "configs/digits.yaml" and
    "runs/digits" are looked up from the project root when they do not exist here.
    """
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    root = project_root()
    if root is None:
        return path
    return root / path


def override_list(overrides: Mapping[str, object] | Sequence[str] | None) -> list[str]:
    """Turn {"synthesis.temperature": 5.0} or ["synthesis.temperature=5"] into override strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise CvddError(f"overrides {overrides!r} is one string; pass a list of 'key=value' strings or a dict")
    return list(overrides)


def check_existing_checkpoints(cfg: RunConfig, dataset: ImageDataset, run: RunFolder) -> None:
    """Reject a run folder whose member checkpoints were made for another class list, before writing."""
    from .models import check_checkpoint_matches

    for arch in cfg.committee.members:
        path = run.member_path(arch)
        if path.is_file():
            meta = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(meta, dict):
                check_checkpoint_matches(meta, dataset, repr(str(path)))


def check_stage_inputs(cfg: RunConfig, dataset: ImageDataset) -> None:
    """Reject settings that would fail mid-run: IPC above a class size, BN matching without BN."""
    from .bn import require_batchnorm
    from .models import create_model
    from .synthesis import resolve_init

    uses_real = "random" in cfg.methods or any(
        resolve_init(m, cfg.synthesis) == "real" for m in cfg.methods if m != "random"
    )
    if uses_real:
        smallest = int(torch.bincount(dataset.train.labels, minlength=dataset.num_classes).min())
        if cfg.synthesis.ipc > smallest:
            raise DataError(
                f"synthesis.ipc={cfg.synthesis.ipc} exceeds the smallest class of {dataset.name!r} "
                f"({smallest} training images) and real-image initialisation needs distinct images; "
                f"use ipc <= {smallest} or synthesis.init=noise"
            )
    if cfg.synthesis.r_bn > 0 and any(m != "random" for m in cfg.methods):
        users = cfg.committee.members if "cvdd" in cfg.methods else [cfg.single_member]
        for arch in users:
            model = create_model(arch, dataset.num_classes, dataset.channels, dataset.image_size,
                                 cfg.member_width(arch))
            require_batchnorm(model, arch)


@dataclass
class Session:
    """An opened run: what every stage function needs, plus shortcuts for notebooks."""

    cfg: RunConfig
    dataset: ImageDataset
    run: RunFolder
    device: torch.device

    def train_committee(self) -> dict:
        """Train the members that have no matching checkpoint; {arch: {"top1", "seconds", ...}}."""
        from .train import pretrain_committee

        return pretrain_committee(self.cfg, self.dataset, self.run, self.device)

    def committee(self, members: Sequence[str] | None = None) -> dict:
        """Load the trained members as frozen models, training any that are missing first."""
        from .train import load_committee

        self.train_committee()
        return load_committee(self.cfg, self.dataset, self.run, self.device, list(members) if members else None)

    def priors(self, compute: bool = True) -> dict[str, float]:
        """Prior performance alpha per member, in percent (Algorithm 1, reused from priors.json)."""
        from .prior import load_or_compute_priors

        return load_or_compute_priors(self.cfg, self.dataset, self.run, self.device, compute=compute)

    def distilled(self, method: str) -> dict:
        """Load the distilled set of `method` from the run folder."""
        from .pipeline import load_distilled

        return load_distilled(self.run, method)

    def run_all(self, callback: Callable | None = None) -> dict:
        """Every stage of the config (skipping finished work); returns metrics.json."""
        from .pipeline import run_pipeline

        return run_pipeline(self.cfg, self.dataset, self.run, self.device, callback=callback)

    def evaluate(self, methods: Sequence[str], students: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, label_modes: Sequence[str] | None = None) -> dict:
        """Post-evaluate distilled sets with other students, seeds or label modes than the config's.

        Results are stored in the run folder like `cvdd evaluate`'s and reused; returns a
        metrics dict (the shape of metrics.json) for these items only.
        """
        import dataclasses

        from .pipeline import run_evaluation, summarize

        evaluate = dataclasses.replace(
            self.cfg.evaluate, students=list(students or self.cfg.evaluate.students),
            seeds=list(self.cfg.evaluate.seeds if seeds is None else seeds),
            label_modes=list(label_modes or self.cfg.evaluate.label_modes),
        )
        cfg = dataclasses.replace(self.cfg, evaluate=evaluate)
        needs_priors = any(m in ("cvdd", "random") for m in methods)
        priors = self.priors(compute=False) if needs_priors else {}
        results = run_evaluation(cfg, self.dataset, self.run, self.device, priors, list(methods))
        return summarize(results, cfg, self.dataset, priors, {})

    def eval_result(self, method: str, student: str, label_mode: str, seed: int) -> dict:
        """Read one post-evaluation result file (curve, final and best top-1, protocol)."""
        path = self.run.eval_path(method, student, label_mode, seed)
        if not path.is_file():
            raise CvddError(f"no evaluation result at {str(path)!r}; run `cvdd evaluate` with student {student!r}, "
                            f"label mode {label_mode!r} and seed {seed} first")
        return read_json(path)

    def metrics(self) -> dict:
        if not self.run.metrics_path.is_file():
            raise CvddError(f"no metrics.json in {str(self.run.root)!r}; run every stage first (cvdd run)")
        return read_json(self.run.metrics_path)


def prepare(cfg: RunConfig, checks: Callable | None = None, console_log: bool = True) -> Session:
    """Validate `cfg`, load the data, then create the run folder, its log and config.yaml.

    `checks(cfg, dataset, run)` runs before anything is written, so bad input leaves the
    run folder as it was.
    """
    from . import distributed

    device = distributed.device(str(resolve_device(cfg.device)))
    if console_log:
        setup_logging()
    dataset = load_dataset(cfg.data)
    run = RunFolder(cfg.resolved_run_dir())
    check_existing_checkpoints(cfg, dataset, run)
    check_stage_inputs(cfg, dataset)
    if checks is not None:
        checks(cfg, dataset, run)
    run.create()
    setup_logging(run.log_path, console=console_log)
    atomic_write_text(run.config_path, config_to_yaml(cfg))
    log.info("run folder %s, device %s, %s", run.root, device, dataset.describe())
    if distributed.active():
        log.info(distributed.describe())
    return Session(cfg, dataset, run, device)


def open_run(config: str | Path = "configs/digits.yaml",
             overrides: Mapping[str, object] | Sequence[str] | None = None,
             run_dir: str | Path | None = None, data_root: str | Path | None = None,
             device: str | None = None) -> Session:
    """Open a run for a notebook: load and validate the config, the data and the run folder.

    Paths (config, run_dir, data.root) may be written relative to the project root. The log
    goes to the run folder's run.log only, so notebook outputs stay readable. In IPython a
    CvddError is shown as its one-line message instead of a traceback.
    """
    install_error_display()
    extra = override_list(overrides)
    if run_dir is not None:
        extra.append(f"run_dir={json.dumps(str(project_path(run_dir)))}")
    if device is not None:
        extra.append(f"device={device}")
    cfg = load_config(project_path(config), extra)
    root = data_root if data_root is not None else cfg.data.root
    if root is not None:
        cfg.data.root = str(project_path(root))
    if run_dir is None:
        cfg.run_dir = str(project_path(cfg.resolved_run_dir()))
    return prepare(cfg, console_log=False)


def _show_one_line(shell, etype, value, tb, tb_offset=None):
    """Show a CvddError in IPython as `cvdd: error: ...`, not as a traceback.

    IPython only collects the lines a handler returns, so the handler shows them itself.
    The cell still counts as failed, so papermill and nbval stop there.
    """
    lines = [f"cvdd: error: {value}"]
    shell._showtraceback(etype, value, lines)
    return lines


def install_error_display() -> None:
    """In IPython, show CvddError as one line (the cell still fails, so papermill stops there)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((CvddError,), _show_one_line)
