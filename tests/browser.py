"""Headless Chromium under selenium, for the web chat page's tests and its screenshots.

The browser is Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh --test`` installs them
where it can); selenium drives that system browser, never one it downloads.
"""

from __future__ import annotations

import os
import shutil

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str, str] | None:
    """The (browser, chromedriver) paths, or None where either is missing."""
    browser = next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def chromium(width: int = 1280, height: int = 860):
    """A headless Chromium whose pages are ``width`` x ``height`` CSS pixels (see :func:`set_viewport`)
    and that keeps the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise RuntimeError("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        f"--window-size={width},{height}",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers have a small /dev/shm
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no request to any other host, the browser's own included
    ):
        options.add_argument(argument)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    set_viewport(chrome, width, height)
    return chrome


def set_viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's exact size (a window size would include the browser's own frame), as a phone if asked."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
