"""Make the README's two screenshots (docs/debug-page.png, docs/reports-page.png) from the real default model.

Starts gunicorn with config/fauxpilot.toml (SmolLM2-135M) on a free port, replays a short Copilot session
(one completion taken whole, one ignored) so the reports have something to show, then drives headless
Chromium (Debian's chromium and chromium-driver, and selenium from requirements-dev.txt) over /ui/ and
/ui/reports. Run from the repository root: ``.venv/bin/python -m docs.screenshots``.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.gunicorn_server import Server

DOCS = Path(__file__).resolve().parent
PROMPT = "import os\n\n\ndef list_python_files(folder):\n    \"\"\"The .py files under folder, sorted.\"\"\"\n    "
SESSION = {"VScode-SessionId": "screenshot-session", "Content-Type": "application/json"}
log = logging.getLogger("docs.screenshots")


def replay_session(server: Server) -> None:
    """A typist who takes one completion whole, then ignores the next."""
    body = {"max_tokens": 24, "temperature": 0, "extra": {"language": "python"}}
    prompt = "# Path: files.py\n" + PROMPT
    first = json.loads(server.request("POST", "/v1/engines/codegen/completions", {"prompt": prompt, **body},
                                      SESSION)[2])["choices"][0]["text"]
    accepted = prompt + first + "\n"
    server.request("POST", "/v1/engines/codegen/completions", {"prompt": accepted, **body}, SESSION)
    server.request("POST", "/v1/engines/codegen/completions", {"prompt": accepted + "\nprint(", **body}, SESSION)


def browser() -> webdriver.Chrome:
    """Headless Chromium, 1400 pixels wide."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=options)


def whole_page(driver: webdriver.Chrome, path: Path) -> None:
    """The page from its top, as tall as its content."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 150, 2400))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    log.info("wrote %s", path)


def main() -> int:
    """Serve the default model, fill the reports, take both screenshots."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), {"FAUXPILOT_WORKERS": "1", "FAUXPILOT_CACHE_DIR": str(Path(tmp) / "cache")})
        try:
            server.wait_ready(600)
            replay_session(server)
            driver = browser()
            try:
                wait = WebDriverWait(driver, 120)
                driver.get(server.url + "/ui/")
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
                code = driver.find_element(By.ID, "code")
                code.clear()
                code.send_keys(PROMPT)
                for field, value in (("max-tokens", "32"), ("temperature", "0")):
                    element = driver.find_element(By.ID, field)
                    element.clear()
                    element.send_keys(value)
                driver.find_element(By.ID, "send").click()
                wait.until(EC.visibility_of_element_located((By.ID, "completion-section")))
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".stop-chip"))
                chips = driver.find_elements(By.CSS_SELECTOR, "#completion-tokens .completion-token")
                if chips:
                    chips[min(3, len(chips) - 1)].click()  # show one token's alternatives
                whole_page(driver, DOCS / "debug-page.png")
                driver.set_window_size(1400, 1200)
                driver.get(server.url + "/ui/reports")
                wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
                whole_page(driver, DOCS / "reports-page.png")
            finally:
                driver.quit()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
