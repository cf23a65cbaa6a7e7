"""The playground in a real browser: headless Chromium from the system's packages (`make
system-packages`), driven by Selenium through the system's chromedriver, against the real
server on loopback with the real bundled models.

Set CHORUS_PLAYGROUND_SCREENSHOT=docs/playground.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, require_system_files

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "Explain in two sentences why the sky is blue."  # both fused experts choose pieces
FUSE_EXPERTS = {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}
ANSWER_TIMEOUT_S = 300  # two answers on a loaded 2-core machine

require_system_files(CHROMIUM, CHROMEDRIVER)

from selenium import webdriver  # noqa: E402  (only once the browser is known to be there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,780", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    # The system's chromedriver, so Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _pane(browser: webdriver.Chrome, model: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'.pane[data-model="{model}"]')


def _text(element: WebElement, selector: str) -> str:
    return str(element.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent"))


def test_the_playground_compares_auto_and_fuse_and_colours_the_fused_text_by_expert(
    server: ServerProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get(f"{server.url}/playground")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#models input"))
    for box in browser.find_elements(By.CSS_SELECTOR, "#models input"):
        if box.is_selected() != (box.get_attribute("value") in ("auto", "fuse")):
            box.click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "run").click()

    def finished(b: webdriver.Chrome) -> bool:
        panes = b.find_elements(By.CSS_SELECTOR, ".pane")
        return len(panes) == 2 and all(
            p.get_attribute("data-state") in ("done", "failed") for p in panes
        )

    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(finished)
    for model in ("auto", "fuse"):
        pane = _pane(browser, model)
        assert pane.get_attribute("data-state") == "done", _text(pane, ".error")
        assert _text(pane, ".output").strip(), model
        # Streamed: the text arrived in many pieces, and the timings and usage were filled in.
        assert len(pane.find_elements(By.CSS_SELECTOR, ".output .piece")) > 1, model
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", _text(pane, ".ttft")), model
        assert re.fullmatch(r"\d+ in · \d+ out", _text(pane, ".tokens")), model
        assert _text(pane, ".cost") != "–", model
        assert _text(pane, ".cluster").isdigit(), model  # both pools are routed
        assert _text(pane, ".ood") in ("yes", "no"), model

    fused = _pane(browser, "fuse")
    spans = fused.find_elements(By.CSS_SELECTOR, ".output .piece")
    experts = [str(s.get_attribute("data-expert")) for s in spans]
    assert "".join(str(s.get_attribute("textContent")) for s in spans) == _text(fused, ".output")
    assert set(experts) <= FUSE_EXPERTS and len(set(experts)) == 2  # every piece coloured
    colours: dict[str, set[str]] = {}
    for span, expert in zip(spans, experts, strict=True):
        assert re.search(r"\be\d\b", str(span.get_attribute("class"))), expert
        colours.setdefault(expert, set()).add(span.value_of_css_property("border-bottom-color"))
    assert all(len(c) == 1 for c in colours.values())  # one colour per expert…
    assert len(set.union(*colours.values())) == 2  # …and a different one for each
    assert "fusion" in _text(fused, ".summary-name")

    # Hover a piece the experts' views were fused for: its step weights show.
    weights = [json.loads(str(s.get_attribute("data-weights"))) for s in spans]
    mixed = next(i for i, w in enumerate(weights) if max(w.values()) < 1)
    ActionChains(browser).move_to_element(spans[mixed]).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 5).until(lambda _: tip.is_displayed())
    assert f"chosen by {experts[mixed]}" in str(tip.get_attribute("textContent"))
    assert len(tip.find_elements(By.CSS_SELECTOR, ".weight")) == 2

    shot = Path(os.environ.get("CHORUS_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
