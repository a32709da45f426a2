"""The web dashboard of stddaq-rest in a real headless browser (Debian's chromium driven by
selenium through chromium-driver; nothing is downloaded): it loads without console errors,
a write started from the page produces the file, the live image changes, config errors are
shown next to their field. Screenshots are kept in test-artifacts/dashboard/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import h5py
import pytest

from tests.conftest import REPO, wait_until
from tests.test_rest import rest  # noqa: F401 - the std-daq services + stddaq-rest fixture

pytestmark = pytest.mark.timeout(240)
ARTIFACTS = Path(os.environ.get("STDDAQ_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup.sh "
                    "installs them)")
    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1500,1400"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_dashboard_in_a_real_browser(browser, rest):  # noqa: F811 - the imported fixture
    driver = browser
    _, agent, url = rest
    driver.get(url + "/")
    wait_until(lambda: text(driver, "writer-state") == "READY", "writer READY on the page")
    wait_until(lambda: text(driver, "detector-name") == agent.config.detector_name,
               "the detector's name from its config")
    wait_until(lambda: agent.service in text(driver, "services"), "the writer agent listed")
    wait_until(lambda: "images arriving" in text(driver, "buffer-line"), "buffer line")

    # the live image changes (its id and its pixels) between two screenshots; the fake
    # detector's images are flat (value = id): a fixed contrast range shows them rising
    driver.find_element("id", "low").send_keys("0")
    driver.find_element("id", "high").send_keys("2000")
    time.sleep(0.5)
    live = driver.find_element("id", "live")
    first_id = wait_until(lambda: live.get_attribute("data-image-id"), "a live image")
    first = live.screenshot_as_png
    (ARTIFACTS / "live_1.png").write_bytes(first)
    wait_until(lambda: live.get_attribute("data-image-id") != first_id, "a newer image")
    time.sleep(0.4)
    second = live.screenshot_as_png
    (ARTIFACTS / "live_2.png").write_bytes(second)
    assert first != second
    driver.find_element("id", "cmap").send_keys("hot")
    wait_until(lambda: "image" in text(driver, "live-info"), "live info")

    # a write started from the page produces the file
    out = agent.out("from_the_page.h5")
    driver.find_element("id", "output-file").send_keys(out)
    n_images = driver.find_element("id", "n-images")
    n_images.clear()
    n_images.send_keys("25")
    driver.find_element("id", "start").click()
    wait_until(lambda: text(driver, "acquisition-state") == "FINISHED", "FINISHED", 30)
    assert "25 of 25 images" in text(driver, "progress-text")
    with h5py.File(out, "r") as f:
        assert f[f"/{agent.config.detector_name}/data"].shape[0] == 25
    wait_until(lambda: "from_the_page.h5" in text(driver, "logs"), "the acquisition logged")
    wait_until(lambda: "writer" in text(driver, "rates-line"), "the rates plotted", 10)
    driver.save_screenshot(str(ARTIFACTS / "after_write.png"))

    # a bad value is shown next to its field; a refused write names the field
    field = driver.find_element("id", "cfg-bit_depth")
    field.clear()
    field.send_keys("13")
    driver.find_element("id", "apply-config").click()
    wait_until(lambda: text(driver, "err-bit_depth"), "the field's error")
    assert "bit_depth" not in text(driver, "err-bit_depth")  # the message, beside its field
    assert "13" in text(driver, "err-bit_depth")
    driver.find_element("id", "output-file").clear()
    driver.find_element("id", "output-file").send_keys("relative.h5")
    driver.find_element("id", "start").click()
    wait_until(lambda: "output_file: expected an absolute" in text(driver, "action-message"),
               "write refused")
    driver.save_screenshot(str(ARTIFACTS / "errors_shown.png"))

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
