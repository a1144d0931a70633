"""Screenshots of the web chat page for the README: docs/web-ui-light.png, web-ui-dark.png, web-ui-phone.png.

Runs ``qwen3 serve`` with the shipped tiny model on a free port and drives the same headless Chromium as
the browser tests (tests/browser.py): one reply whose reasoning is unfolded, then a calculator round trip.

    .venv/bin/python scripts/web_ui_screenshots.py [--output docs]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import chromium, set_viewport  # noqa: E402
from tests.live_server import free_port, wait_healthy  # noqa: E402

logger = logging.getLogger("web_ui_screenshots")


def wait_for(driver, script: str, timeout: float = 60.0) -> None:
    """Until ``script`` (JavaScript returning a truth value) holds in the page."""
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            raise TimeoutError(script)
        time.sleep(0.05)


def replies_done(count: int) -> str:
    return (
        f"return document.querySelectorAll('.msg.assistant').length === {count} && "
        "!document.body.classList.contains('busy')"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "qwen3.cli", "serve", "--port", str(port), "--kv-cache-memory", "256MiB"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        wait_healthy(server, url, timeout=120)
        driver = chromium(1280, 860)
        driver.get(url + "/")
        wait_for(driver, "return document.getElementById('model-name').textContent !== ''")
        prompt = driver.find_element("id", "prompt")
        prompt.send_keys("How many r's are in strawberry?\n")
        wait_for(driver, replies_done(1))
        driver.find_element("id", "tools").click()
        prompt.send_keys("What is 347 * 58?\n")
        wait_for(driver, replies_done(3))
        driver.find_element("css selector", ".msg.assistant .reasoning summary").click()  # unfold the first
        driver.execute_script("document.getElementById('messages').scrollTop = 0")
        args.output.mkdir(parents=True, exist_ok=True)
        toggle = driver.find_element("id", "theme")
        for theme in ("light", "dark"):
            while toggle.text != f"Theme: {theme}":  # the page's own toggle: auto -> light -> dark
                toggle.click()
            path = args.output / f"web-ui-{theme}.png"
            driver.save_screenshot(str(path))
            logger.info("wrote %s", path)
        set_viewport(driver, 390, 844, mobile=True)
        driver.execute_script("document.getElementById('messages').scrollTop = 1e9")
        time.sleep(0.3)
        path = args.output / "web-ui-phone.png"
        driver.save_screenshot(str(path))
        logger.info("wrote %s", path)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
