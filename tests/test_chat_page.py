"""The chat page (``GET /``) in a real headless browser: Debian's chromium and chromedriver,
driven by selenium, against the default model behind a broker and the gateway.

It types messages and waits for the streamed replies, checks that the stats line shows cached
tokens from the second turn on, presses Stop during a long reply (and checks the worker stopped
too), shows an overflow inline with its numbers, starts a new chat, fits a phone-width window,
and saves a screenshot (``KVROUTE_SCREENSHOT=PATH`` keeps a copy there).

``scripts/ensure-chromium.sh`` (run by ``make test``) installs the browser. Without it the test
skips, saying so, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_harness import REAL_MODEL_HEARTBEAT, Harness, start_harness

from kvroute import Client
from kvroute.engine.engine import Engine
from kvroute.gateway import GatewayConfig, GatewayThread

pytestmark = pytest.mark.timeout(300)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
WAIT = 90.0  # seconds for a reply of the real model on a busy machine


def browser_or_skip() -> None:
    """Skip (fail under CI) unless chromium, chromedriver and selenium are all here."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"{', '.join(missing)} missing (scripts/ensure-chromium.sh installs the browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def served(engine: Engine) -> Iterator[tuple[Harness, str]]:
    """A broker, one worker with the default model, and the gateway; yields (harness, url)."""
    h = start_harness(engine, 1, heartbeat=REAL_MODEL_HEARTBEAT)
    gw = GatewayThread(GatewayConfig(connect=h.frontend, port=0, timeout=60))
    try:
        yield h, gw.start()
    finally:
        gw.close()
        h.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kvroute-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(driver: Any, cond: Callable[[Any], Any], timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond)


def say(driver: Any, text: str, max_tokens: int) -> None:
    """Type a message with its reply limit and press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    limit = driver.find_element(By.ID, "max-tokens")
    limit.clear()
    limit.send_keys(str(max_tokens))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def stats(driver: Any, n: int) -> Any:
    """The stats line of the n-th reply, once it is there (the reply has ended)."""
    from selenium.webdriver.common.by import By

    lines = until(
        driver,
        lambda d: (s := d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")) and len(s) >= n
        and s,
    )  # fmt: skip
    return lines[n - 1]


def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_page_is_served_from_the_package_and_loads_nothing_from_elsewhere() -> None:
    """``GET /`` and its two files come from package data (so a wheel has them), and nothing in
    them points outside the gateway: the page works offline. No broker is needed to serve it."""
    from importlib.resources import files

    import httpx

    static = files("kvroute.gateway").joinpath("static")
    names = sorted(f.name for f in static.iterdir() if f.name.endswith((".html", ".css", ".js")))
    assert names == ["chat.css", "chat.js", "index.html"]
    cfg = GatewayConfig(connect="tcp://127.0.0.1:9", port=0, timeout=1, health_timeout=0.3)
    with GatewayThread(cfg) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == static.joinpath("index.html").read_text()
        for name, kind in (("chat.js", "javascript"), ("chat.css", "text/css")):
            r = http.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
            assert r.text == static.joinpath(name).read_text()
        assert http.get("/static/nope.js").status_code == 404
    for name in names:
        text = static.joinpath(name).read_text()
        # The SVG namespace is a name, not a download; anything else absolute would be.
        external = re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text.replace(SVG_NS, ""))
        assert not external, (name, external)
        assert "@import" not in text and "cdn" not in text.lower(), name


SVG_NS = "http://www.w3.org/2000/svg"


@pytest.mark.model
def test_chat_page_streams_shows_the_cache_and_stops(
    served: tuple[Harness, str], browser: Any, tmp_path: Path, engine: Engine
) -> None:
    from selenium.webdriver.common.by import By

    harness, url = served
    d = browser
    d.get(f"{url}/")
    until(d, lambda d: d.find_element(By.ID, "badge-fleet").text == "1 worker")
    assert d.find_element(By.ID, "badge-model").text.startswith("SmolLM2")

    # Turn 1 is cold; turn 2 reuses the cache, and the stats line says how much.
    say(d, "What is the capital of France?", 24)
    first = stats(d, 1)
    assert first.get_attribute("data-path") == "cold"
    assert first.get_attribute("data-cached") == "0"
    assert "cold: new" in first.text and "TTFT" in first.text
    say(d, "And of Italy?", 24)
    second = stats(d, 2)
    assert second.get_attribute("data-path") == "text_prefix"
    m = re.search(r"cached (\d+) / (\d+) prompt tokens", second.text)
    assert m is not None, second.text
    cached, prompt = int(m[1]), int(m[2])
    assert 0 < cached < prompt
    assert (str(cached), str(prompt)) == (
        second.get_attribute("data-cached"),
        second.get_attribute("data-prompt"),
    )
    replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .bubble")
    assert all(r.text.strip() for r in replies)

    # Stop during a long reply: the page stops, and so does the worker.
    say(d, "Tell me a very long story about a brave knight and a dragon.", 600)
    last = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .bubble")[-1]  # noqa: E731
    until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 3)
    until(d, lambda d: len(last(d).text) >= 20)
    stop = d.find_element(By.ID, "stop")
    assert stop.is_displayed() and not d.find_element(By.ID, "send").is_displayed()
    stop.click()
    third = stats(d, 3)
    assert third.get_attribute("data-stopped") == "1"
    with Client(harness.frontend, timeout=10) as client:
        # 600 tokens take the worker tens of seconds: the turn ends at once, cancelled.
        wait_until(lambda: client.status().broker.requests_in_flight == 0, 5.0)
        wait_until(lambda: client.status().totals.turns >= 3, 5.0)
        assert client.status().totals.generated_tokens < 24 + 24 + 300
    assert d.find_element(By.ID, "send").is_displayed()
    bars = d.find_elements(By.CSS_SELECTOR, "#ttft-chart rect.bar")
    assert [b.get_attribute("class") for b in bars] == ["bar cold", "bar warm", "bar stopped"]

    # An overflow is shown inline with its numbers; the message goes back to the input.
    say(d, "Go on.", 4000)
    error = until(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))[0]
    assert "context" in error.text and "4000" in error.text and str(engine.n_ctx) in error.text
    assert d.find_element(By.ID, "input").get_attribute("value") == "Go on."

    shot = tmp_path / "chat-page.png"
    assert d.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("KVROUTE_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)

    # A phone-width window: nothing sticks out sideways, and the composer is on screen.
    d.set_window_size(390, 844)
    width = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert width <= 0
    assert d.find_element(By.ID, "input").is_displayed()

    # New chat: a fresh session, so its first turn is cold again.
    d.find_element(By.ID, "new-chat").click()
    assert not d.find_elements(By.CSS_SELECTOR, ".msg")
    d.find_element(By.ID, "input").clear()
    say(d, "Hello!", 8)
    fresh = stats(d, 1)
    assert fresh.get_attribute("data-path") == "cold"
    assert len(d.find_elements(By.CSS_SELECTOR, "#ttft-chart rect.bar")) == 1
