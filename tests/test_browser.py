"""The quick tour in a real browser: JupyterLab + headless Chromium, driven by Playwright.

Starts JupyterLab on 127.0.0.1 (a copy of the notebook in a temporary folder, random token),
opens ``notebooks/01_quick_tour.ipynb`` in Debian's Chromium, runs all cells, and checks that
every cell ran without an error, that the matplotlib pictures are drawn as images, and that
the gate explorer widget (ipywidgets: slider, dropdown, its plot) is rendered. Screenshots go
to ``$ADAPTERLAB_SCREENSHOTS`` (default: ``runs/browser-check/``).

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (no ``playwright install``:
the system Chromium is used). Skipped, with the reason, when either is missing.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "01_quick_tour.ipynb"
CHROMIUM = Path(os.environ.get("ADAPTERLAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RUN_TIMEOUT_S = 900  # the whole notebook, cold cache included (the tiny base may be built on first use)


def _skip_reason() -> str | None:
    if not CHROMIUM.is_file():
        return f"Chromium not found at {CHROMIUM} (install it with: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; the system Chromium is used)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "JupyterLab is not installed (pip install jupyterlab)"
    if not NOTEBOOK.is_file():
        return f"{NOTEBOOK.relative_to(REPO)} does not exist yet"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab_server(tmp_path):
    """JupyterLab on loopback serving a temporary copy of the notebook; yields (base_url, token, folder)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# JavaScript run in the page: the state of every code cell of the open notebook.
CELL_STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.widgets) return null;
  return panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
    count: c.model.executionCount,
    prompt: (c.node.querySelector('.jp-InputPrompt') || {}).textContent || '',
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
  }));
}"""


def test_quick_tour_runs_in_jupyterlab_and_renders_plots_and_widgets(jupyterlab_server):
    from playwright.sync_api import sync_playwright

    base, token, root = jupyterlab_server
    shots = Path(os.environ.get("ADAPTERLAB_SCREENSHOTS", REPO / "runs" / "browser-check"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(root.parent / "chromium-profile"),  # fresh profile
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=120_000)
            # The notebook opens with its kernel (kernelspec metadata: no "Select Kernel" dialog).
            page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                timeout=180_000,
            )
            assert page.locator(".jp-Dialog").count() == 0, "a dialog (kernel selection?) blocks the notebook"
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            deadline = time.time() + RUN_TIMEOUT_S
            cells = None
            while time.time() < deadline:
                cells = page.evaluate(CELL_STATE_JS)
                errors = [e for c in cells for e in c["errors"]]
                assert not errors, f"a cell raised in the browser: {errors}"
                if cells and all(c["count"] is not None and "*" not in c["prompt"] for c in cells):
                    break
                time.sleep(2)
            else:
                page.screenshot(path=str(shots / "quick_tour_timeout.png"))
                pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT_S}s: {cells}")

            # matplotlib figures arrive as PNG images and are decoded by the browser.
            images = page.locator(".jp-OutputArea-output img")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('.jp-OutputArea-output img')).some(i => i.naturalWidth > 0)",
                timeout=30_000,
            )
            n_images = images.count()
            drawn = page.evaluate(
                "() => Array.from(document.querySelectorAll('.jp-OutputArea-output img')).filter(i => i.naturalWidth > 0).length"
            )
            assert n_images >= 2 and drawn == n_images, f"{drawn} of {n_images} images drawn"

            # The gate explorer: a live ipywidgets view (not the "Loading widget..." fallback text).
            widget = page.locator(".jp-OutputArea-output .widget-vbox").first
            widget.wait_for(state="visible", timeout=60_000)
            assert widget.locator(".widget-slider, .widget-hslider").count() >= 1, "the explorer has no slider"
            assert widget.locator("select, .widget-dropdown").count() >= 1, "the explorer has no layer picker"
            widget.locator("img").first.wait_for(state="visible", timeout=60_000)
            assert page.get_by_text("Loading widget...").count() == 0, "a widget did not render"

            # It is live: picking another layer makes the kernel redraw the explorer's picture.
            picker = widget.locator("select").first
            options = picker.locator("option").all_text_contents()
            if len(options) > 1:
                before = widget.locator("img").first.get_attribute("src")
                picker.select_option(label=options[0] if picker.input_value() != options[0] else options[1])
                page.wait_for_function(
                    "([sel, old]) => { const i = document.querySelector(sel); return i && i.src && i.src !== old; }",
                    arg=[".jp-OutputArea-output .widget-vbox img", before], timeout=60_000,
                )

            widget.scroll_into_view_if_needed()
            widget.screenshot(path=str(shots / "quick_tour_gate_explorer.png"))
            page.screenshot(path=str(shots / "quick_tour.png"))
        finally:
            context.close()
    assert (shots / "quick_tour_gate_explorer.png").stat().st_size > 5_000
