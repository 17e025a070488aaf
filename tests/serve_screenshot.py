"""Take docs/img/serve.png: the page with results, on a running ``pmgen serve`` (real models).

    make serve &                      # or: python -m pmgen.serve serve --port 8000
    python tests/serve_screenshot.py --url http://127.0.0.1:8000 --out docs/img/serve.png

Drives Debian's chromium like a person: a new user sends a few cat stickers and says a chat line,
the target comes from a chat message, generate, move α to 0.9, then like the chosen candidate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from test_serve_browser import CHROMIUM, CHROMIUM_ARGS


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, default=Path("docs/img/serve.png"))
    p.add_argument("--user", default="mia")
    p.add_argument("--alpha-steps-left", type=int, default=10, help="α = 1 − 0.01 × this after generating")
    a = p.parse_args()
    if not a.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("the screenshot is taken from a local server only")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1280, "height": 980}, device_scale_factor=1)
        page.set_default_timeout(180_000)
        page.goto(a.url + "/")
        page.evaluate("localStorage.clear()")
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#user-id", a.user)
        page.click("#use-user")
        page.fill("#event-search", "cat")
        page.wait_for_selector("#event-results .item[data-id='1F431']")
        for n, item in enumerate(("1F431", "1F63A", "1F638"), start=1):
            page.click(f"#event-results .item[data-id='{item}']")
            page.wait_for_function(f"document.querySelector('#n-events').textContent === '({n} events)'")
        page.fill("#chat-line", "my cat knocked my coffee over again")
        page.click("#say")
        page.wait_for_function("document.querySelector('#n-events').textContent === '(4 events)'")
        page.fill("#target-message", "good night, I am so tired")
        page.click("#target-from-message")
        page.wait_for_selector("#target-current img")
        page.fill("#weights", "0,0.5,1,1.5,2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#candidates .cand').length === 5")
        page.wait_for_function(
            "[...document.querySelectorAll('#candidates img, #history img')].every(i => i.complete)")
        page.locator("#alpha").focus()  # move α towards personalization: the page re-selects live
        page.keyboard.press("End")
        for _ in range(a.alpha_steps_left):
            page.keyboard.press("ArrowLeft")
        chosen = page.get_attribute("#candidates .cand.chosen", "data-index")
        page.click(f"#candidates .cand[data-index='{chosen}'] .fb[data-signal='like']")
        page.wait_for_function("document.querySelector('#candidates .cand.chosen .fb-state').textContent !== ''")
        page.fill("#event-search", "")
        page.fill("#target-search", "sleepy")
        page.wait_for_timeout(800)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.out), full_page=True)
        b.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
