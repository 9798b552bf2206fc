"""gradio_demo.py in a real headless browser (Debian's chromium driven by Playwright): a question gets a
streamed answer, two tabs keep their own conversations, Clear empties the page."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed "
                                "(bash scripts/setup_env.sh --test installs it)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tiny_model_dir, random_adapter, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("gradio") / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "gradio_demo.py"), "--base_model", tiny_model_dir, "--lora_model",
         random_adapter, "--template_name", "chatml", "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                                                                 GRADIO_ANALYTICS_ENABLED="False"))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    if process.poll() is not None or time.monotonic() >= deadline:
        process.kill()
        log.seek(0)
        pytest.fail(f"the demo did not start:\n{log.read()[-3000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def ask(page, question):
    box = page.locator("textarea").first
    box.fill(question)
    box.press("Enter")


def answer_texts(page, timeout=60) -> list[str]:
    """The bot message's text each time it changed, until it stays the same for two seconds."""
    seen, stable_since, deadline = [], time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        bots = page.locator('[data-testid="bot"]')
        text = bots.last.inner_text().strip() if bots.count() else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            stable_since = time.monotonic()
        elif seen and time.monotonic() - stable_since > 2:
            break
        time.sleep(0.05)
    return seen


def test_a_streamed_answer_own_conversations_per_tab_and_clear(page_url, browser, tmp_path):
    first, second = browser.new_page(), browser.new_page()
    for page in (first, second):
        page.goto(page_url)
        page.wait_for_selector("textarea")
    ask(first, "What causes anemia?")
    ask(second, "高血压怎么办？")  # both tabs generate at the same time
    texts = answer_texts(first)
    assert texts and texts[-1], "no answer appeared"
    # The page renders markdown, so markup in the tiny model's random words ("~~", "**") shows literally
    # until it is closed and then disappears: compare the words and characters only.
    words = [re.sub(r"[\W_]+", "", text) for text in texts]
    assert len(texts) >= 2 and all(words[-1].startswith(w) for w in words[:-1]), f"not streamed: {texts}"
    answer_texts(second)
    assert first.locator('[data-testid="user"]').all_inner_texts() == ["What causes anemia?"]
    assert second.locator('[data-testid="user"]').all_inner_texts() == ["高血压怎么办？"]
    assert second.locator('[data-testid="bot"]').count() == 1
    first.screenshot(path=str(tmp_path / "gradio_demo.png"))
    assert (tmp_path / "gradio_demo.png").stat().st_size > 10_000
    first.get_by_role("button", name="Clear", exact=True).click()
    deadline = time.monotonic() + 10
    while first.locator('[data-testid="bot"]').count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.locator('[data-testid="bot"]').count() == 0
    assert second.locator('[data-testid="bot"]').count() == 1  # the other tab keeps its conversation
