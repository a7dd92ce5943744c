"""The chat page driven in a real headless Chromium (Debian's, through Playwright), as a
person would use it: load the page, pick the model, send a message with Enter and watch the
answer stream in, stop a long answer and see the server end its generation, and no console
errors or failed requests on the way. Run by tests/browser.rs against a duet it started.

usage: chat_page.py BASE_URL SCREENSHOT_PATH
"""

import json
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

BASE, SCREENSHOT = sys.argv[1], sys.argv[2]


def health():
    with urllib.request.urlopen(BASE + "/health", timeout=10) as r:
        return json.load(r)


def main():
    problems = []
    with urllib.request.urlopen(BASE + "/", timeout=10) as r:
        csp = r.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        # The page forbids evaluated scripts (its CSP); the test's own probes are evaluated.
        page = browser.new_page(viewport={"width": 1000, "height": 760}, bypass_csp=True)
        page.on("console", lambda m: m.type == "error" and problems.append("console: " + m.text))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on(
            "response",
            lambda r: r.status >= 400 and problems.append(f"{r.status} for {r.url}"),
        )
        page.goto(BASE + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.locator("#model").input_value(), "the model list is filled"
        page.wait_for_function("!document.querySelector('#student').textContent.includes('…')")

        # A message sent with Enter streams in: the answer grows while it is generated.
        page.fill("#message", "Write three sentences about the sea.")
        page.press("#message", "Enter")
        answer = page.locator(".turn.assistant").last
        page.wait_for_function(
            "document.querySelector('.turn.assistant div') &&"
            " document.querySelector('.turn.assistant div').textContent.length > 0",
            timeout=60_000,
        )
        lengths = []
        while page.locator("#send").is_disabled() and len(lengths) < 400:
            lengths.append(len(answer.inner_text()))
            time.sleep(0.02)
        page.wait_for_function("!document.querySelector('#send').disabled", timeout=120_000)
        assert len(set(lengths)) > 2, f"the answer arrived in pieces: {lengths[:20]}"
        meta = answer.locator(".meta").inner_text()
        assert "student" in meta and "tokens/s" in meta, meta
        assert page.locator(".turn.user").first.inner_text() == "Write three sentences about the sea."

        # Shift+Enter is a new line, not a send.
        page.fill("#message", "a")
        page.press("#message", "Shift+Enter")
        assert page.locator(".turn.user").count() == 1
        page.fill("#message", "")

        # Stop: the client leaves, and the server ends the generation at its next token.
        cancelled = health()["student"]["cancelled"]
        page.fill("#message", "Tell me a very long story about a lighthouse keeper, in detail.")
        page.click("#send")
        page.wait_for_function(
            "document.querySelectorAll('.turn.assistant').length == 2 &&"
            " document.querySelectorAll('.turn.assistant')[1].textContent.length > 20",
            timeout=60_000,
        )
        page.click("#stop")
        page.wait_for_function("!document.querySelector('#send').disabled")
        for _ in range(100):
            if health()["student"]["cancelled"] > cancelled:
                break
            time.sleep(0.05)
        assert health()["student"]["cancelled"] == cancelled + 1, "the server stopped generating"
        assert "stopped" in page.locator(".turn.assistant").last.inner_text()

        page.screenshot(path=SCREENSHOT)
        browser.close()
    assert not problems, problems
    print("chat page ok")


if __name__ == "__main__":
    main()
