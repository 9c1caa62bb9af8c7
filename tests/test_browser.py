"""A real browser: JupyterLab on 127.0.0.1, 03_synthesis run in headless Chromium, the panel clicked.

Needs Debian's chromium (/usr/bin/chromium; `make test` installs it) and Playwright's Python
client, which drives that executable; no browser is downloaded.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MEMBERS = ["resnet18", "mobilenet_v2"]
TINY = {
    "committee.members": MEMBERS, "train.epochs": 1, "committee.width": 0.125, "prior.values":
    {"resnet18": 80.0, "mobilenet_v2": 70.0}, "methods": ["cvdd"], "synthesis.ipc": 2, "workers": 1,
}
TOKEN = "cvdd-browser-test"
# Each wait; generous because the suite shares two cores with whatever else runs.
TIMEOUT_MS = int(os.environ.get("CVDD_BROWSER_TIMEOUT_MS", "180000"))
# Flags for a closed network: no background connections, no first-run pages.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A committee in a run folder, 03_synthesis with tiny parameters, and JupyterLab serving it."""
    from cvdd.session import open_run

    assert Path(CHROMIUM).is_file(), f"Debian's chromium is missing at {CHROMIUM}; run `apt-get install chromium`"
    monkeypatch.setenv("CVDD_NO_PROGRESS", "1")
    run_dir = tmp_path / "run"
    open_run(ROOT / "configs" / "digits.yaml", TINY, run_dir=run_dir).train_committee()
    served = tmp_path / "lab"
    served.mkdir()
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "03_synthesis.ipynb"), str(served / "03_synthesis.ipynb"), prepare_only=True,
        parameters={"run_dir": str(run_dir), "overrides": TINY, "members": MEMBERS, "iterations": 12,
                    "update_every": 3, "ipc": 2},
    )
    port = free_port()
    env = {**os.environ, "CVDD_NO_PROGRESS": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter" / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter" / "runtime")}
    log = open(tmp_path / "jupyterlab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={served}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else [])],
        cwd=served, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", process)
        yield {"url": f"http://127.0.0.1:{port}", "folder": tmp_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_panel_live_plot_changes_on_run(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    folder = lab["folder"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            page.goto(f"{lab['url']}/lab/tree/03_synthesis.ipynb?token={TOKEN}")
            page.locator(".jp-Notebook").first.wait_for()
            # JupyterLab may ask which kernel to start; the notebook's own (python3) is preselected.
            select = page.get_by_role("button", name="Select", exact=True)
            try:
                select.wait_for(timeout=15_000)
                select.click()
            except PlaywrightTimeout:
                pass
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first).to_be_attached()

            # Run all cells from the menu, as a user would.
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            panel = page.locator(".widget-vbox").filter(has=page.locator(".widget-button")).first
            panel.wait_for()
            for member in MEMBERS:
                expect(panel.locator(".widget-checkbox", has_text=member)).to_be_visible()
            expect(panel.locator(".widget-hslider", has_text="T")).to_be_visible()
            expect(panel.locator(".widget-dropdown", has_text="voter")).to_be_visible()
            run_button = panel.locator("button.widget-button", has_text="Run")
            expect(run_button).to_be_visible()
            # The notebook's own run finishes and the panel status shows it.
            status = panel.locator(".widget-html", has_text="done:")
            status.wait_for()
            plot = panel.locator("img").first
            before = plot.screenshot()

            # Three images per class instead of two, then Run: the background run redraws the plot.
            ipc_box = panel.locator(".widget-text", has_text="IPC").locator("input")
            ipc_box.fill("3")
            ipc_box.press("Enter")
            run_button.click()
            expect(panel.locator(".widget-html", has_text="running")).to_be_visible()
            expect(panel.locator(".widget-html", has_text="done: 30 images")).to_be_visible()
            after = plot.screenshot()
            page.screenshot(path=str(folder / "synthesis-panel.png"), full_page=False)
            panel.screenshot(path=str(folder / "synthesis-panel-widgets.png"))
        except Exception:
            page.screenshot(path=str(folder / "failure.png"))
            raise
        finally:
            browser.close()
    assert before != after, "the live plot did not change after pressing Run"
    assert (folder / "synthesis-panel.png").stat().st_size > 10_000
    if os.environ.get("CVDD_SCREENSHOT_TO"):
        shutil.copy(folder / "synthesis-panel-widgets.png", os.environ["CVDD_SCREENSHOT_TO"])
