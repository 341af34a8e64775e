"""The debug page and the reports page in a real browser (headless Chromium driven by Selenium) against real
gunicorn serving the tiny model with an API key. Screenshots go to tests/artifacts/."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.gunicorn_server import serving_tiny_model

pytestmark = pytest.mark.slow

KEY = "browser-test-key"
ARTIFACTS = Path(__file__).parent / "artifacts"  # git-ignored; CI keeps it as the run's artifacts
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_SECONDS = 60

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run "
                "installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """gunicorn serving the tiny model, with one API key and its own usage database."""
    with serving_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("browser"), {"FAUXPILOT_API_KEYS": KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the Debian package) through its chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str) -> None:
    """The whole page as a PNG in tests/artifacts/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height + 250, 800), 3200))  # the window includes the browser frame
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / name))
    driver.set_window_size(1400, 1200)
    print(f"\nscreenshot: {ARTIFACTS / name}")


def wait(driver):
    """A wait of up to WAIT_SECONDS."""
    return WebDriverWait(driver, WAIT_SECONDS)


def enter_key(driver) -> None:
    """The page asks for the key (the server answered 401): type it in."""
    field = wait(driver).until(EC.visibility_of_element_located((By.ID, "key-input")))
    field.send_keys(KEY)
    driver.find_element(By.ID, "key-submit").click()
    wait(driver).until(EC.invisibility_of_element_located((By.ID, "key-form")))


def post(server, path: str, body: dict, headers: dict | None = None) -> dict:
    """POST with the key; the JSON of a 200 reply."""
    status, _, text = server.request("POST", path, body, {"Authorization": f"Bearer {KEY}", **(headers or {})})
    assert status == 200, text
    return json.loads(text)


def test_debug_page_completes_and_shows_tokens_and_stop(server, browser):
    """Ask for the key, complete a prompt: the text streams in, prompt and completion chips with their
    alternatives, the stop rule, the timings; the curl command it copies gives the same completion."""
    browser.get(server.url + "/ui/")
    enter_key(browser)
    wait(browser).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "tiny"
    code = browser.find_element(By.ID, "code")
    code.clear()
    code.send_keys("def fibonacci(n):\n    if n < 2:\n        return n\n    ")
    for field, value in (("max-tokens", "12"), ("temperature", "0"), ("stop", "[]")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "send").click()
    wait(browser).until(EC.visibility_of_element_located((By.ID, "completion-section")))
    stop = browser.find_element(By.ID, "stop-reason").text
    assert "max_tokens" in stop or "eos_token" in stop, stop
    prompt_chips = browser.find_elements(By.CSS_SELECTOR, "#prompt-tokens .prompt-token")
    completion_chips = browser.find_elements(By.CSS_SELECTOR, "#completion-tokens .completion-token")
    assert len(prompt_chips) > 10 and browser.find_elements(By.CSS_SELECTOR, ".stop-chip")
    timings = browser.find_element(By.ID, "timings").text
    assert "prefill" in timings and "tokens/s" in timings
    shown = browser.find_element(By.ID, "completion-text").get_attribute("textContent")
    # The same request an editor would send, through the real route (curl), gives the same greedy text.
    browser.find_element(By.ID, "copy-curl").click()
    command = browser.find_element(By.ID, "curl").text
    assert command.startswith("curl -sS ") and "/v1/completions" in command and KEY in command
    reply = json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                                      check=True).stdout)
    served = reply["choices"][0]["text"]
    assert shown == served
    assert len(completion_chips) == reply["usage"]["completion_tokens"] - (1 if "eos_token" in stop else 0)
    if completion_chips:
        completion_chips[0].click()
        assert "logprob" in browser.find_element(By.ID, "alternatives").text
    screenshot(browser, "debug-page.png")


def test_reports_page_shows_the_requests_just_made(server, browser):
    """Three Copilot requests of one session (Python), the second taking the first's completion whole: the reports
    page counts them, the inferred acceptance included, under the key's label (the debug test's curl request is
    counted too, in language "unknown")."""
    from app.usage import key_label

    session = {"VScode-SessionId": "browser-session"}
    body = {"max_tokens": 8, "temperature": 0, "logit_bias": {"0": -100, "1": -100, "2": -100},
            "extra": {"language": "python"}}
    prompt = "# Path: fib.py\ndef fib(n):\n"
    shown = post(server, "/v1/engines/codegen/completions", {"prompt": prompt, **body}, session)["choices"][0]["text"]
    assert shown.strip()
    accepted = prompt + shown + "\n"
    post(server, "/v1/engines/codegen/completions", {"prompt": accepted, **body}, session)
    post(server, "/v1/engines/codegen/completions", {"prompt": accepted + "print(fib(10))\n", **body}, session)

    browser.get(server.url + "/ui/reports")
    if browser.find_elements(By.CSS_SELECTOR, "#key-form:not(.hidden)"):
        enter_key(browser)
    wait(browser).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
    rows = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#by-language tr"):
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        if cells:
            rows[cells[0]] = cells
    assert rows["python"][1:5] == ["3", "3", "1", "33.3%"]  # requests, shown, accepted, acceptance
    assert browser.find_element(By.ID, "total-accepted").text == "1"
    assert int(browser.find_element(By.ID, "total-requests").text) >= 3
    keys = browser.find_element(By.ID, "by-key").text
    assert key_label(KEY) in keys and KEY not in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-requests rect.bar")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-acceptance circle.point")
    screenshot(browser, "reports-page.png")
