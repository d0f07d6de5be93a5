"""`kdlab report` end to end on a tiny kd-vs-scratch study with a hostile experiment name: files, numbers
re-derived from the store, escaping, one-line errors, and the page rendered in headless Chromium."""
from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.store import Store
from kdlab.study.stats import paired_difference

NAME = 'tiny<b>&"x"'
TINY = {
    "name": NAME,
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 3, "batch_size": 50, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 3, "batch_size": 50, "device": "cpu"},
    "seeds": [0, 1],
    "grid": {"method": {"kd": {"name": "kd", "temperature": 2.0, "alpha": 0.5}, "scratch": {"name": "scratch"}}},
}
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "results" / "report_example" / "report.html"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1600")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    workspace = tmp / "ws"
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["--workspace", str(workspace), "run", str(config), "--quiet"]) == 0
    out = tmp / "out" / "report.html"
    assert main(["--workspace", str(workspace), "report", NAME, "--out", str(out)]) == 0
    return {"workspace": workspace, "out": out, "page": out.read_text(), "tmp": tmp}


def test_report_files_and_paired_numbers_match_the_store(study):
    page, out = study["page"], study["out"]
    markdown = out.with_suffix(".md").read_text()
    folder = out.with_name("report_files")
    for name in ("learning_curves", "reliability"):
        assert list(folder.rglob(f"{name}.png")) and list(folder.rglob(f"{name}.svg"))
    # Every figure the Markdown links exists beside it; the HTML inlines as many PNGs.
    links = re.findall(r"\]\(([^)]+\.(?:png|svg))\)", markdown)
    assert links and all((out.parent / link).is_file() for link in links)
    assert page.count('<img src="data:image/png;base64,') == len([l for l in links if l.endswith(".png")]) >= 4
    # Paired Δ against scratch (the default baseline), re-derived from the stored final metrics.
    runs = Store(study["workspace"]).runs(experiment=NAME, role="student")
    by = {(r.config["method"]["name"], r.seed): r.final["test/acc"] for r in runs}
    delta = paired_difference([by["kd", 0], by["kd", 1]], [by["scratch", 0], by["scratch", 1]])
    assert f"+{delta.mean:.4f} ± {delta.half_width:.4f}" in page
    assert "Baseline for the paired comparison: method=scratch" in page
    assert "the last epoch (train.selection: last)" in page
    # Config diff: only differing keys (method.*), never the shared student or data keys.
    diff = page[page.index("Configuration differences"):page.index("Results</h3>")]
    assert "method.name" in diff and "student.width" not in diff and "data.num_train" not in diff


def test_report_escapes_names_and_is_self_contained(study):
    page = study["page"]
    assert NAME not in page and html.escape(NAME) in page
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_unknown_experiment_and_baseline_are_one_line_errors(study, capsys):
    ws = str(study["workspace"])
    out = str(study["tmp"] / "x.html")
    assert main(["--workspace", ws, "report", "nope", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'nope'" in err[0]
    assert main(["--workspace", ws, "report", NAME, "--baseline", "method=dkd", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--baseline 'method=dkd'" in err[0] and "method=scratch" in err[0]
    assert main(["--workspace", ws, "report", NAME, "--out", str(study["tmp"] / "x.pdf")]) == 2
    assert not Path(out).exists()


def _browser():
    """A selenium Chrome driver on Debian's chromium, or a skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium + chromedriver installed (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium must not phone home
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='kdlab-chromium-')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def _check_in_browser(browser, page: Path, shot: Path) -> None:
    import numpy as np
    from matplotlib.image import imread

    browser.get(page.resolve().as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert images and all(done and width > 0 and height > 0 for done, width, height in images), images
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    assert browser.execute_script("return document.querySelectorAll('table').length") >= 2
    assert browser.save_screenshot(str(shot))
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.var(pixels)) > 1e-3  # not a blank page


def test_report_renders_in_headless_chromium(study):
    browser = _browser()
    try:
        _check_in_browser(browser, study["out"], study["tmp"] / "screenshot.png")
        if EXAMPLE.is_file():  # the checked-in example (the quickstart's report) renders too
            _check_in_browser(browser, EXAMPLE, study["tmp"] / "example.png")
    finally:
        browser.quit()
