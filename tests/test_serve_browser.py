"""The page in a real browser: Debian's chromium driven by Playwright, a uvicorn server on tiny models.

Walks what a person does: create a user with events, pick a target, generate, wait for the
candidates, move the α slider and see the chosen one change, like one, reload, find the like.
Chromium comes from the system package (``make setup`` installs it); Playwright never downloads one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("playwright")

import httpx  # noqa: E402
import torch  # noqa: E402
from serve_helpers import running_server, toy_catalog  # noqa: E402

from pmgen.data.schema import Event, User  # noqa: E402
from pmgen.stages.select import z_score  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CHAT_LINE = "I love cats"


def library_choice(cands: list[dict], alpha: float) -> int:
    """pmgen.stages.select's rule: argmax z, ties (to 1e-9) → the smaller weight."""
    z = z_score(torch.tensor([c["d_t"] for c in cands], dtype=torch.float64),
                torch.tensor([c["d_p"] for c in cands], dtype=torch.float64), alpha)
    return max(range(len(cands)), key=lambda i: (round(float(z[i]), 9), -i))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: `make setup` installs it (apt-get install chromium)")
        pytest.skip("/usr/bin/chromium is missing (run `make setup`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_pmg, toy_data, tmp_path_factory, module_store_url):
    """The app on 127.0.0.1:<free port> in a background thread (uvicorn), stopped at the end."""
    from pmgen.serve.app import create_app

    app = create_app(tiny_pmg, toy_catalog(toy_data), root=tmp_path_factory.mktemp("serve-browser"),
                     store_url=module_store_url)
    with running_server(app) as base:
        yield base


def _seed_where_alpha_matters(pmg, catalog) -> int:
    """A seed whose candidates are chosen differently at α = 0 and α = 1 (tiny random models), for the
    request the page will send (the same user history, target and image as the service uses)."""
    from pmgen.data.requests import history_image_paths

    items = catalog.items
    user = User("walker", [Event("social", item_id="b", value="send"), Event("social", item_id="b", value="send"),
                           Event("conversation", text=CHAT_LINE, speaker="user")])
    for seed in range(30):
        res = pmg.generate(user, items["a"], items, weights=(0, 1, 2), seed=seed, user_id="walker",
                           target_image=catalog.image_path("a"),
                           history_images=history_image_paths(catalog, user, items))
        rec = res.record.to_json() if hasattr(res.record, "to_json") else res.record
        if library_choice(rec["candidates"], 0.0) != library_choice(rec["candidates"], 1.0):
            return seed
    pytest.fail("no seed in 0..29 where α changes the choice on the tiny models")


def test_page_walkthrough_slider_and_feedback_survive_reload(browser, server, tiny_pmg, toy_data):
    seed = _seed_where_alpha_matters(tiny_pmg, toy_catalog(toy_data))
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests_out: list[str] = []
    page.on("request", lambda r: requests_out.append(r.url))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert "OpenMoji" in page.inner_text("#credit")

    # a new user with events: two clicked stickers and a chat line
    page.fill("#user-id", "walker")
    page.click("#use-user")
    page.fill("#event-search", "cat")
    page.wait_for_selector("#event-results .item[data-id='b']")
    page.click("#event-results .item[data-id='b']")
    page.wait_for_function("document.querySelector('#n-events').textContent === '(1 events)'")
    page.click("#event-results .item[data-id='b']")
    page.wait_for_function("document.querySelector('#n-events').textContent === '(2 events)'")
    page.fill("#chat-line", CHAT_LINE)
    page.click("#say")
    page.wait_for_function("document.querySelector('#n-events').textContent === '(3 events)'")
    assert page.locator("#history img").count() == 2 and CHAT_LINE in page.inner_text("#history")
    assert page.locator("#keywords .chip").count() > 0

    # a target by search, then generate and wait for the candidates
    page.fill("#target-search", "grinning")
    page.click("#target-results .item[data-id='a']")
    assert "grinning face" in page.inner_text("#target-current")
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.wait_for_selector("#progress:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#candidates .cand').length === 3", timeout=30_000)
    assert "done" in page.inner_text("#status")
    page.wait_for_function(  # every candidate image loads
        "[...document.querySelectorAll('#candidates .cand img')].every(i => i.complete && i.naturalWidth > 0)")

    gen_id = page.evaluate("localStorage.getItem('pmgen.generation')")
    rec = httpx.get(f"{server}/v1/generations/{gen_id}").json()["record"]
    cands = rec["candidates"]
    assert page.get_attribute("#candidates .cand.chosen", "data-index") == str(rec["chosen"])

    # the page's re-selection is the library's, over a grid of α
    for a in [i / 20 for i in range(21)]:
        assert page.evaluate("([c, a]) => window.pmgenChoose(c, a)", [cands, a]) == library_choice(cands, a), a

    # move the slider with the keyboard: α = 0 then α = 1 → a different chosen candidate
    slider = page.locator("#alpha")
    slider.focus()
    page.keyboard.press("Home")
    assert page.inner_text("#alpha-value") == "0.00"
    at0 = int(page.get_attribute("#candidates .cand.chosen", "data-index"))
    page.keyboard.press("End")
    assert page.inner_text("#alpha-value") == "1.00"
    at1 = int(page.get_attribute("#candidates .cand.chosen", "data-index"))
    assert (at0, at1) == (library_choice(cands, 0.0), library_choice(cands, 1.0))
    assert at0 != at1
    assert page.locator("#candidates .cand.chosen").count() == 1

    # like one candidate; reload; the like is still there (from the store)
    liked = 2
    page.click(f"#candidates .cand[data-index='{liked}'] .fb[data-signal='like']")
    page.wait_for_function(
        f"document.querySelector(\"#candidates .cand[data-index='{liked}'] .fb-state\").textContent.includes('liked')")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("document.querySelectorAll('#candidates .cand').length === 3")
    assert "liked" in page.inner_text(f"#candidates .cand[data-index='{liked}'] .fb-state")
    assert page.locator(f"#candidates .cand[data-index='{liked}'] .fb.active[data-signal='like']").count() == 1
    assert "1 feedback signal" in page.inner_text("#user-summary")
    prof = httpx.get(f"{server}/v1/users/walker").json()
    assert [(f["candidate"], f["signal"]) for f in prof["feedback"]] == [(liked, "like")]

    assert errors == []
    assert all(u.startswith(server) for u in requests_out), "the page fetched something from another host"
    page.close()


def test_page_with_a_token_sends_it_on_reads_and_images(browser, tiny_pmg, toy_data, tmp_path):
    """``--token --public-read``: the page loads, asks for the token once, and every API read — the
    catalog and candidate images included — carries it."""
    from pmgen.serve.app import create_app

    app = create_app(tiny_pmg, toy_catalog(toy_data), root=tmp_path / "serve", host="0.0.0.0", token="s3cret",
                     public_read=True)
    with running_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        errors, prompts, unauthorized = [], [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: unauthorized.append(r.url) if r.status == 401 else None)

        def give_token(dialog):
            prompts.append(dialog.message)
            dialog.accept("s3cret")

        page.on("dialog", give_token)
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert prompts == ["This server needs its API token:"]
        page.wait_for_function(  # catalog images are API reads: fetched with the token
            "[...document.querySelectorAll('#target-results .item img')].length === 4 && "
            "[...document.querySelectorAll('#target-results .item img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.inner_text("#ready") == "models ready"
        page.fill("#user-id", "tok")
        page.click("#use-user")
        page.click("#event-results .item[data-id='b']")
        page.wait_for_function("document.querySelector('#n-events').textContent === '(1 events)'")
        page.click("#target-results .item[data-id='a']")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#candidates .cand').length === 3", timeout=30_000)
        page.wait_for_function(
            "[...document.querySelectorAll('#candidates .cand img')].every(i => i.complete && i.naturalWidth > 0)")
        assert errors == [] and len(prompts) == 1
        assert all(u.startswith(base + "/v1/") for u in unauthorized)  # only the first reads, before the prompt
        page.close()
