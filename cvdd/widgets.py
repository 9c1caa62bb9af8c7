"""ipywidgets panels for JupyterLab: a thin layer over `cvdd.synthesis` and `cvdd.plots`.

The panel's Run button starts synthesis in a background thread, so the kernel stays free
and the live plots update while the images are optimised. Under papermill and nbval no
front end fires callbacks; notebooks then call `SynthesisPanel.run()` directly, which
produces the same results from the notebook's parameters alone.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from typing import Sequence

import torch

from .analysis import intra_class_cosine
from .config import SynthesisConfig, config_from_dict, config_to_dict
from .errors import ConfigError, CvddError
from .plots import figure_png, image_grid, plot_synthesis_progress
from .session import Session

log = logging.getLogger(__name__)

VOTERS = ("prior", "equal", "random")


class SynthesisMonitor:
    """Synthesis callback that keeps the curves of a run and redraws them.

    Each record (see `cvdd.synthesis.synthesize_item`) adds the CE and BN terms and the
    weight of each drawn expert, and the intra-class cosine similarity of all images so
    far: the final images of finished batches plus the current batch.
    """

    def __init__(self, class_names: Sequence[str], on_update=None):
        self.class_names = list(class_names)
        self.on_update = on_update
        self.history: dict = {"ce": {}, "bn": {}, "weights": {}, "cosine": []}
        self.finished_images: list[torch.Tensor] = []
        self.finished_labels: list[torch.Tensor] = []
        self.current_item = None
        self.current_images = None
        self.current_labels = None
        self.offset = 0
        self.updates = 0

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all images so far, (N, C, H, W) in [0, 1], and their labels (N,)."""
        images = self.finished_images + ([self.current_images] if self.current_images is not None else [])
        labels = self.finished_labels + ([self.current_labels] if self.current_labels is not None else [])
        if not images:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(images), torch.cat(labels)

    def __call__(self, record: dict) -> None:
        if record["item"] != self.current_item:
            if self.current_images is not None:
                self.finished_images.append(self.current_images)
                self.finished_labels.append(self.current_labels)
                self.offset += self.last_iterations
            self.current_item = record["item"]
        self.last_iterations = record["iterations"]
        self.current_images = record["images"]
        self.current_labels = torch.tensor(record["labels"])
        step = self.offset + record["iteration"]
        for index, expert in enumerate(record["experts"]):
            for key in ("ce", "bn", "weights"):
                self.history[key].setdefault(expert, []).append((step, record[key][index]))
        images, labels = self.images()
        similarity = intra_class_cosine(images, labels)
        if similarity:
            self.history["cosine"].append((step, sum(similarity.values()) / len(similarity)))
        self.updates += 1
        if self.on_update is not None:
            self.on_update(self)

    def figure(self):
        return plot_synthesis_progress(self.history)

    def grid(self):
        images, labels = self.images()
        return image_grid(images, labels, self.class_names)


class SynthesisPanel:
    """Committee checkboxes, T, N, voter, IPC and iterations, a Run button and live plots.

    Args:
        session: an opened run (`cvdd.session.open_run`) with a trained committee and priors.
        method: "cvdd", "sre2l++" or "sre2l"; the single-member methods use the first checked member.
        members, temperature, experts, voter, ipc, iterations: the starting values of the widgets
            (default: the run's synthesis config).
        update_every: iterations between live-plot updates.
    """

    def __init__(self, session: Session, method: str = "cvdd", members: Sequence[str] | None = None,
                 temperature: float | None = None, experts: int | None = None, voter: str | None = None,
                 ipc: int = 2, iterations: int | None = None, update_every: int = 10):
        import ipywidgets as w

        self.session = session
        self.method = method
        scfg = session.cfg.synthesis
        all_members = list(session.cfg.committee.members)
        chosen = list(members) if members is not None else all_members
        unknown = [m for m in chosen if m not in all_members]
        if unknown:
            raise ConfigError(f"member(s) {unknown} are not in the committee {all_members}; choose from it")
        self.update_every = update_every
        start = self._validated(
            chosen, scfg.temperature if temperature is None else temperature,
            scfg.experts if experts is None else experts, scfg.voter if voter is None else voter, ipc,
            scfg.iterations if iterations is None else iterations,
        )
        self.member_boxes = {m: w.Checkbox(value=m in chosen, description=m, indent=False,
                                           layout=w.Layout(width="auto")) for m in all_members}
        exponent = math.log10(start.temperature)
        self.temperature = w.FloatLogSlider(value=start.temperature, base=10, min=min(-1.0, exponent),
                                            max=max(2.0, exponent), step=0.05, description="T",
                                            continuous_update=False)
        self.experts = w.Dropdown(options=list(range(1, len(all_members) + 1)), value=start.experts,
                                  description="N experts")
        self.voter = w.Dropdown(options=list(VOTERS), value=start.voter, description="voter")
        self.ipc = w.BoundedIntText(value=start.ipc, min=1, max=100000, description="IPC")
        self.iterations = w.BoundedIntText(value=start.iterations, min=1, max=1000000, description="iterations")
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.status = w.HTML(value="<i>not run yet</i>")
        self.plot = w.Image(format="png", value=figure_png(plot_synthesis_progress({})))
        self.grid = w.Image(format="png")
        self.button.on_click(self._on_click)
        self.result: dict | None = None
        self.monitor: SynthesisMonitor | None = None
        self._thread: threading.Thread | None = None

    def widget(self):
        """Return the panel as one ipywidgets box, for `display`."""
        import ipywidgets as w

        controls = w.VBox([
            w.HTML("<b>committee</b>"), w.HBox(list(self.member_boxes.values())),
            w.HBox([self.temperature, self.experts, self.voter]),
            w.HBox([self.ipc, self.iterations, self.button]), self.status,
        ])
        return w.VBox([controls, self.plot, self.grid])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def members(self) -> list[str]:
        return [m for m, box in self.member_boxes.items() if box.value]

    def synthesis_config(self) -> SynthesisConfig:
        """Build the run's synthesis config with the widget values, validated like a YAML config."""
        return self._validated(self.members(), self.temperature.value, self.experts.value, self.voter.value,
                               self.ipc.value, self.iterations.value)

    def _validated(self, members: list[str], temperature: float, experts: int, voter: str, ipc: int,
                   iterations: int) -> SynthesisConfig:
        if not members:
            raise ConfigError("no committee member is checked; check at least one")
        if self.method == "cvdd" and experts > len(members):
            raise ConfigError(f"number of experts N={experts} exceeds the {len(members)} checked "
                              f"member(s); check more members or lower N")
        data = config_to_dict(self.session.cfg.synthesis)
        data.update(temperature=temperature, experts=experts, voter=voter, ipc=ipc, iterations=iterations,
                    callback_every=self.update_every, member=members[0])
        return config_from_dict(data, SynthesisConfig)

    def run(self) -> dict:
        """Distil with the current widget values and return the distilled set.

        Runs in the calling thread; the Run button calls it from a background thread.
        The images are kept in memory (`self.result`), not written to the run folder.
        """
        from .synthesis import distill

        scfg = self.synthesis_config()
        members = self.members()
        session = self.session
        committee = session.committee(members)
        priors = session.priors() if self.method == "cvdd" else {}
        self.monitor = SynthesisMonitor(session.dataset.class_names, on_update=self._redraw)
        self.status.value = f"running {self.method} with {', '.join(members)} ..."
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cvdd-panel-") as out_dir:
            self.result = distill(self.method, committee, priors, session.dataset, scfg, out_dir, session.device,
                                  seed=session.cfg.seed, single_member=members[0], callback=self.monitor,
                                  flip=session.cfg.train.flip)
        self._redraw(self.monitor)
        self.status.value = (f"done: {len(self.result['images'])} images, {self.monitor.updates} plot updates, "
                             f"{time.perf_counter() - start:.1f} s")
        return self.result

    def _redraw(self, monitor: SynthesisMonitor) -> None:
        self.plot.value = figure_png(monitor.figure())
        self.grid.value = figure_png(monitor.grid(), dpi=60)

    def _on_click(self, _button) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run_in_background, daemon=True)
        self._thread.start()

    def _run_in_background(self) -> None:
        self.button.disabled = True
        try:
            self.run()
        except CvddError as exc:
            self.status.value = f"<span style='color:#b00'>cvdd: error: {exc}</span>"
        except Exception as exc:  # shown in the panel; a background thread has no cell to fail
            log.exception("synthesis from the panel failed")
            self.status.value = f"<span style='color:#b00'>failed: {type(exc).__name__}: {exc}</span>"
        finally:
            self.button.disabled = False

    def wait(self, timeout: float | None = None) -> None:
        """Block until a run started by the button has finished."""
        if self._thread is not None:
            self._thread.join(timeout)

    def figure(self):
        """Draw the latest curves as a matplotlib Figure (for static notebook output and reports)."""
        if self.monitor is None:
            raise CvddError("the panel has not run yet; call run() or press Run first")
        return self.monitor.figure()

