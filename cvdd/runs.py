"""The run folder: layout, atomic writes and logging to `run.log`.

Every artifact is written to a temporary name in its target folder and renamed into
place, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("cvdd")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


class RunFolder:
    """Paths of one run's artifacts (see the layout in the README)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create(self) -> "RunFolder":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def member_path(self, arch: str) -> Path:
        return self.root / "committee" / f"{arch}.pt"

    @property
    def priors_path(self) -> Path:
        return self.root / "priors.json"

    def distilled_dir(self, method: str) -> Path:
        return self.root / "distilled" / method

    def eval_path(self, method: str, student: str, label_mode: str, seed: int) -> Path:
        return self.root / "eval" / method / f"{student}-{label_mode}-seed{seed}.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"


class ValidationFolder(RunFolder):
    """The validation view of a run folder: outputs under <run>/validation/.

    Members are those Algorithm 1 trained on its split (<run>/prior/committee/), and the
    priors, config and log are the run's own.
    """

    def __init__(self, base: RunFolder):
        super().__init__(base.root / "validation")
        self.base = base

    @property
    def log_path(self) -> Path:
        return self.base.log_path

    def member_path(self, arch: str) -> Path:
        return self.base.root / "prior" / "committee" / f"{arch}.pt"

    @property
    def priors_path(self) -> Path:
        return self.base.priors_path


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO, console: bool = True) -> None:
    """Send cvdd's log records to stderr (unless `console` is false) and append them to `log_file`."""
    logger = logging.getLogger("cvdd")
    logger.setLevel(level)
    logger.propagate = False
    if not console:
        for handler in [h for h in logger.handlers if getattr(h, "_cvdd_console", False)]:
            logger.removeHandler(handler)
    elif not any(getattr(h, "_cvdd_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        console._cvdd_console = True
        logger.addHandler(console)
    if log_file is not None:
        log_file = Path(log_file).resolve()
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                if Path(handler.baseFilename) == log_file:
                    return
                logger.removeHandler(handler)
                handler.close()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(file_handler)


@contextmanager
def stage(name: str, timings: dict | None = None):
    """Log the start, end and duration of a stage; store the seconds in `timings[name]`."""
    log.info("stage %s: started", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + seconds
    log.info("stage %s: finished in %.1f s", name, seconds)


def resolve_device(name: str = "auto") -> torch.device:
    """Return the device for `name`; `auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from .errors import ConfigError

        raise ConfigError(f"device {name!r} is invalid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
    return device


def peak_rss_bytes() -> int:
    """Peak resident set size of this process or of its largest finished worker process.

    Linux reports kilobytes. Worker processes count once they have exited.
    """
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, children)) * 1024
