"""The web UI in a real headless Chromium (Debian's chromium + chromedriver, through Selenium):
upload an image and ask, then generate and see the image under its synthetic label.  Screenshots
go to ``test-artifacts/`` (or ``$UNIMEDVL_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from serving_helpers import RunningServer, free_port  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (installed by .ci/run)")
ARTIFACTS = Path(os.environ.get("UNIMEDVL_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def ui_server(pipe):
    from unimedvl.serving import ServeConfig, create_app

    running = RunningServer(create_app(pipe, ServeConfig(max_image_side=32, min_image_side=16, max_steps=4, max_new_tokens=16)), free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, seconds=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.25).until(condition)


def test_ask_then_generate_in_the_browser(ui_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    scan = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(scan)
    browser.get(ui_server.url + "/ui/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ask-file input[type=file]"))
    assert "not for clinical use" in browser.find_element(By.ID, "notice").text

    browser.find_element(By.CSS_SELECTOR, "#ask-file input[type=file]").send_keys(str(scan))
    _wait(browser, lambda d: "scan" in d.find_element(By.ID, "ask-file").text)  # shown as "scan | .png"
    browser.find_element(By.CSS_SELECTOR, "#ask-question textarea").send_keys("What is shown in this image?")
    browser.find_element(By.ID, "ask-button").click()
    bot = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#ask-chat [data-testid="bot"]'))
    chat = browser.find_element(By.ID, "ask-chat").text
    assert "What is shown in this image?" in chat and len(bot) == 1
    browser.save_screenshot(str(ARTIFACTS / "web_ui_ask.png"))

    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Generate").click()
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#gen-prompt textarea").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#gen-prompt textarea").send_keys("Frontal chest radiograph with a focal opacity.")
    browser.find_element(By.ID, "gen-button").click()
    img = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gen-image img"))
    _wait(browser, lambda d: img[0].get_attribute("naturalWidth") not in (None, "0"))
    assert img[0].get_attribute("naturalWidth") == "32"
    assert "SYNTHETIC" in browser.find_element(By.ID, "gen-label").text and "seed 42" in browser.find_element(By.ID, "gen-label").text
    assert "SYNTHETIC" in browser.find_element(By.ID, "gen-image").text  # the image's own label
    browser.save_screenshot(str(ARTIFACTS / "web_ui_generate.png"))
    assert (ARTIFACTS / "web_ui_generate.png").stat().st_size > 10_000
