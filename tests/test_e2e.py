"""The real app in headless Debian Chromium (Playwright, no downloaded browser): every page
renders, the sparsity slider changes the numbers. Screenshots go to a temporary folder; to refresh
the README's: MODHIFI_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest tests/test_e2e.py"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from oracles import prune_page_numbers

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Streamlit server did not come up within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./setup.sh (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    return browser.new_page(viewport={"width": 1400, "height": 1000})


def _settle(page, timeout: float = 120) -> None:
    """Wait until Streamlit has finished the current run (no 'Running…' status widget)."""
    page.wait_for_timeout(500)
    page.wait_for_selector("[data-testid='stStatusWidget']", state="detached", timeout=timeout * 1000)
    page.wait_for_timeout(300)


def _metric(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']", has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text()


def _shoot(page, path: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the
    viewport is made as tall as that container's content first (full_page alone stops at the
    window), then put back."""
    height = page.evaluate("""() => Math.max(...[...document.querySelectorAll(
        "[data-testid='stMain'], [data-testid='stAppViewContainer'], [data-testid='stSidebar']")]
        .map(e => e.scrollHeight), document.body.scrollHeight)""")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": int(height) + 40})
    page.wait_for_timeout(800)  # charts re-render at the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where the screenshots go: a temporary folder unless MODHIFI_SCREENSHOTS names one."""
    folder = Path(os.environ.get("MODHIFI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_link_opens_its_view_with_the_sidebar_and_the_address_follows(app_url, browser):
    """First on a fresh server: a visitor opening a shared link lands on that page, with the sidebar, the model,
    target and kind of the link; moving the slider rewrites the address."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{app_url}/prune?model=digits-cnn&target=0.3&kind=channels")
    page.wait_for_selector("[data-testid='stMetric']", timeout=120_000)
    _settle(page)
    assert page.locator("[data-testid='stSidebar']", has_text="Model").count()
    slider = page.locator("[data-testid='stSlider']", has_text="Remove")
    assert float(slider.locator("[data-testid='stSliderThumbValue']").inner_text()) == 0.3
    slider.get_by_role("slider").focus()
    page.keyboard.press("ArrowRight")
    _settle(page)
    page.wait_for_function("() => location.search.includes('target=0.35')", timeout=60_000)
    assert "model=digits-cnn" in page.url and "kind=channels" in page.url
    page.context.close()


def test_pages_render_and_the_slider_updates_the_numbers(app_url, page, shots):
    page.goto(f"{app_url}/?model=digits-cnn")
    page.wait_for_selector("[data-testid='stMetric']", timeout=120_000)
    _settle(page)
    assert "%" in _metric(page, "Test accuracy")
    _shoot(page, shots / "overview.png")

    for name in ("fidelity", "unlearn", "theory", "prune"):
        page.goto(f"{app_url}/{name}?model=digits-cnn")
        page.wait_for_selector("[data-testid='stMetric']", timeout=120_000)
        _settle(page)
        assert not page.locator("[data-testid='stException']").count()
        _shoot(page, shots / f"{name}.png")

    macs, accuracy = _metric(page, "MACs / image"), _metric(page, "Accuracy")
    thumb = page.locator("[data-testid='stSlider']", has_text="Remove").get_by_role("slider")
    thumb.focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    _settle(page)
    page.wait_for_function(
        "old => [...document.querySelectorAll(\"[data-testid='stMetricValue']\")]"
        ".some(e => e.innerText.includes(' M') && e.innerText !== old)", arg=macs, timeout=60_000)
    assert (accuracy, macs) == prune_page_numbers("digits-cnn", 0.5)  # the default position
    moved = (_metric(page, "Accuracy"), _metric(page, "MACs / image"))
    assert moved == prune_page_numbers("digits-cnn", 0.7)  # 4 steps of 0.05 to the right
    _shoot(page, shots / "prune-moved.png")
    assert Image.open(shots / "prune-moved.png").height > 1000  # the whole page, not the window


@pytest.mark.zoo
@pytest.mark.parametrize("model", ["fmnist-resnet", "fmnist-vgg", "fmnist-vit"])
def test_every_page_of_every_zoo_model_renders_in_the_browser(app_url, browser, shots, model):
    """The default view of every page on the Fashion-MNIST models (opt in: -m zoo): numbers,
    no exception, no error box; a full-height screenshot of each."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    for name in ("", "fidelity", "prune", "unlearn", "theory"):
        page.goto(f"{app_url}/{name}?model={model}")
        page.wait_for_selector("[data-testid='stMetric']", timeout=300_000)
        _settle(page, timeout=300)
        assert not page.locator("[data-testid='stException']").count(), (model, name)
        assert not page.locator("[data-testid='stAlertContentError']").count(), (model, name)
        _shoot(page, shots / f"{model}-{name or 'overview'}.png")
    page.context.close()


def test_four_browsers_moving_sliders_at_once_each_see_their_own_numbers(app_url, browser):
    """Four visitors on one server move the Prune slider to different positions at the same
    moment; each sees exactly what the library computes for their position alone."""
    targets = (0.45, 0.40, 0.35, 0.30)  # 1..4 steps left of the default 0.50
    pages = [browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
             for _ in targets]
    for page in pages:
        page.goto(f"{app_url}/prune?model=digits-cnn")
    for page in pages:
        page.wait_for_selector("[data-testid='stMetric']", timeout=120_000)
        _settle(page)
    thumbs = [p.locator("[data-testid='stSlider']", has_text="Remove").get_by_role("slider")
              for p in pages]
    for steps, thumb in enumerate(thumbs, 1):  # all four reruns overlap on the server
        thumb.focus()
        for _ in range(steps):
            thumb.press("ArrowLeft")
    for page, thumb, target in zip(pages, thumbs, targets):
        _settle(page)
        value = page.locator("[data-testid='stSlider']", has_text="Remove").locator(
            "[data-testid='stSliderThumbValue']").inner_text()
        assert float(value) == pytest.approx(target)
        assert not page.locator("[data-testid='stException']").count()
        shown = (_metric(page, "Accuracy"), _metric(page, "MACs / image"))
        assert shown == prune_page_numbers("digits-cnn", target), target
    for page in pages:
        page.context.close()


def test_the_text_model_prunes_and_answers_the_try_it_box_in_the_browser(app_url, browser, shots):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{app_url}/prune?model=minilm-l6&calibration=250")
    page.wait_for_selector("[data-testid='stMetric']", timeout=300_000)
    _settle(page, timeout=300)
    assert not page.locator("[data-testid='stException']").count()
    cosine = float(_metric(page, "Embedding cosine"))
    assert 0.5 < cosine <= 1
    assert _metric(page, "Kept: FFN neurons") == f"{6 * 1072} / {6 * 1536}"
    box = page.get_by_label("Type a sentence")
    box.fill("The computer crashed again")
    box.press("Enter")
    _settle(page, timeout=300)
    tables = page.locator("[data-testid='stDataFrame']")
    assert tables.count() == 3  # the dense and the pruned neighbours, then the run history
    _shoot(page, shots / "prune-text.png")
    page.context.close()


@pytest.mark.zoo
def test_the_text_model_forgets_a_category_in_the_browser(app_url, browser, shots):
    """The Unlearn page of the text model (opt in: -m zoo; the edit and two audits of the real
    model take about a minute): the audit's figures, and the try-it box under both models."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{app_url}/unlearn?model=minilm-l6")
    page.wait_for_selector("[data-testid='stMetric']", timeout=300_000)
    _settle(page, timeout=300)
    assert not page.locator("[data-testid='stException']").count()
    assert float(_metric(page, "Forget accuracy").rstrip("%")) <= 10
    assert page.get_by_text("dense model — reads the sentence as").count() == 1
    assert page.get_by_text("edited model — reads the sentence as").count() == 1
    _shoot(page, shots / "unlearn-text.png")
    page.context.close()
