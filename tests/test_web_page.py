"""The web page of `btsearch serve`, end to end in headless Chromium driven by Playwright.

The real server (uvicorn on a free port) serves the trained test checkpoint's collection of
sample photos; the browser types a query, uploads an image through the file input and by drag
and drop, and opens a hit. Chromium is Debian's (`/usr/bin/chromium`, installed by `.ci/run`):
without it these tests skip, unless BTSEARCH_REQUIRE_BROWSER=1 (as CI sets) makes that a failure.
"""

import base64
import os
import re
import shutil

import pytest

from btsearch.model.encoder import Encoder
from btsearch.serve.app import create_app
from tests.helpers import index_with_captions, serve_in_thread

CHROMIUM = os.environ.get("BTSEARCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's background services would try a network this machine does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a search on 2 busy cores with the model on CPU takes seconds, not minutes


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


missing = _browser_missing()
if missing and os.environ.get("BTSEARCH_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"BTSEARCH_REQUIRE_BROWSER=1 but {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


TOKEN = "page-token"


def assert_best_is_own(shown: list[str], own, what) -> None:
    """The hits as the page lists them (best first, each with `match 0.123`): the first is one
    of `own`'s, or one of those shows a match as high to the last digit shown. The trained
    checkpoint ranks a photo's own captions first, by a margin no CPU promises: near a tie,
    float rounding picks the first."""
    matches = [float(re.search(r"match (\d+\.\d+)", text).group(1)) for text in shown]
    best_own = max((m for text, m in zip(shown, matches) if own(text)), default=None)
    assert best_own is not None and best_own >= matches[0] - 0.0011, (what, shown)


def _serve(app):
    """(url, stop) of `app` served on a free loopback port."""
    url, _, stop = serve_in_thread(app)
    return url, stop


@pytest.fixture(scope="module")
def web_db(tmp_path_factory, trained_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("web") / "db"
    index_with_captions(db, trained_checkpoint, photos, photo_captions)
    return db, Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")


@pytest.fixture(scope="module")
def server_url(web_db):
    url, stop = _serve(create_app(web_db[0], encoder=web_db[1]))
    yield url
    stop()


@pytest.fixture(scope="module")
def token_server_url(web_db):
    url, stop = _serve(create_app(web_db[0], encoder=web_db[1], token=TOKEN))
    yield url
    stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server_url)
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def test_typing_a_query_shows_the_expected_photo_first_and_opens_it(page, photos):
    page.fill("#q", "a close up of a tabby cat")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid figure.hit")
    captions = page.locator("#grid figure.hit figcaption").all_inner_texts()
    assert len(captions) == len(photos)  # k=24 on an 11-photo collection shows every photo
    assert captions[0].startswith("#1 match 0.") and " itm " in captions[0], captions[0]
    assert_best_is_own(captions, lambda caption: caption.endswith("chelsea.jpg"), "the cat's caption")
    # Both scores are shown, the re-ranked ones with an ITM logit.
    assert " itc " in captions[0] and "itm -" not in captions[0]
    first = captions[0].split()[-1]  # the file name of the first hit, which the viewer opens
    thumbnail = page.locator("#grid figure.hit img").first
    thumbnail.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())

    thumbnail.click()
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#fullpath").endswith("/" + first)
    page.wait_for_function("() => document.getElementById('full').naturalWidth > 0")


def test_uploading_an_image_lists_its_captions(page, photos, photo_captions):
    chelsea = next(p for p in photos if p.name == "chelsea.jpg")
    page.set_input_files("#file", str(chelsea))
    page.wait_for_selector("#texts li.hit")
    shown = page.locator("#texts li.hit").all_inner_texts()
    assert_best_is_own(shown, lambda text: any(text.startswith(caption) for caption in photo_captions["chelsea"]), "the cat's photo")
    assert page.locator("#grid figure").count() == 0


def test_dropping_an_image_lists_its_captions(page, photos, photo_captions):
    astronaut = next(p for p in photos if p.name == "astronaut.jpg")
    payload = base64.b64encode(astronaut.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(payload) => {
            const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            return transfer;
        }""",
        payload,
    )
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    assert "over" in page.get_attribute("#drop", "class")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#texts li.hit")
    shown = page.locator("#texts li.hit").all_inner_texts()
    assert_best_is_own(shown, lambda text: any(text.startswith(caption) for caption in photo_captions["astronaut"]), "the astronaut's photo")


def test_a_file_that_is_not_an_image_gets_the_servers_reason(page, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are not pixels")
    page.set_input_files("#file", str(notes))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('cannot read image')")
    assert page.locator("#texts li").count() == 0 and page.locator("#grid figure").count() == 0
    assert page.get_attribute("#status", "class") == "error"



def test_explain_shows_where_the_words_look_and_the_words_that_weigh_most(page):
    page.fill("#q", "a close up of a tabby cat")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid figure.hit button.explain")
    first = page.locator("#grid figure.hit figcaption").first.inner_text().split()[-1]  # the first hit's file name
    page.locator("#grid figure.hit button.explain").first.click()
    page.wait_for_selector("#explainer[open]")
    page.wait_for_function("() => document.getElementById('heat').complete && document.getElementById('heat').naturalWidth > 0")
    assert page.inner_text("#why").startswith("match 0.") and page.inner_text("#why").endswith(" " + first)  # the hit it was asked about
    words = page.locator("#words li.word").all_inner_texts()
    assert words and all(text.split()[0] in "a close up of a tabby cat".split() for text in words)
    page.locator("#words li.word").first.click()
    page.wait_for_function("() => document.getElementById('heat').dataset.word !== ''")
    page.wait_for_function("() => document.getElementById('heat').complete && document.getElementById('heat').naturalWidth > 0")


def test_a_server_with_a_token_asks_for_it_once_and_sends_it_with_every_request(browser, token_server_url):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    prompts, sent = [], []
    page.on("dialog", lambda dialog: (prompts.append(dialog.message), dialog.accept(TOKEN)))
    page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
    page.goto(token_server_url)
    page.fill("#q", "a close up of a tabby cat")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid figure.hit")
    # Thumbnails need the token too: they are fetched with it and shown from blob: URLs.
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')].every((img) => img.complete && img.naturalWidth > 0)")
    assert len(prompts) == 1 and "token" in prompts[0]
    api_requests = [(url, authorization) for url, authorization in sent if "/api/" in url]
    assert api_requests[0][1] is None and all(a == f"Bearer {TOKEN}" for _, a in api_requests[1:])  # the first one got the 401
    assert all(TOKEN not in url for url, _ in sent)  # never in a URL
    assert page.evaluate("sessionStorage.getItem('btsearch-token')") == TOKEN
    page.reload()  # kept for the tab: no second question
    page.fill("#q", "a close up of a tabby cat")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid figure.hit")
    assert len(prompts) == 1
    context.close()


def shown_ranks(page) -> list[int]:
    return [int(text.split()[0][1:]) for text in page.locator("#grid figure.hit figcaption").all_inner_texts()]


def test_the_search_lives_in_the_address_and_the_back_button_returns_to_it(page, server_url):
    page.goto(f"{server_url}/?q=a+close+up+of+a+tabby+cat&k=4")  # a shared address runs its search
    page.wait_for_selector("#grid figure.hit")
    assert page.input_value("#q") == "a close up of a tabby cat" and shown_ranks(page) == [1, 2, 3, 4]
    page.click("#more")  # the next page: the address says its offset
    page.wait_for_function("() => location.search.includes('offset=4')")
    page.wait_for_function("() => document.querySelector('#grid figure.hit figcaption').textContent.startsWith('#5 ')")
    assert shown_ranks(page) == [5, 6, 7, 8]
    page.fill("#q", "a cup of coffee")
    page.fill("#where", "id < 6")
    page.check("#collapse")
    page.press("#q", "Enter")
    page.wait_for_function("() => new URLSearchParams(location.search).get('q') === 'a cup of coffee'")
    params = page.evaluate("() => Object.fromEntries(new URLSearchParams(location.search))")
    assert params == {"q": "a cup of coffee", "where": "id < 6", "collapse": "true", "k": "4"}, params
    page.wait_for_function("() => document.getElementById('status').textContent !== 'searching...'")
    page.go_back()  # the cat's second page again, its fields restored
    page.wait_for_function("() => document.getElementById('q').value === 'a close up of a tabby cat'")
    page.wait_for_function("() => document.querySelector('#grid figure.hit figcaption').textContent.startsWith('#5 ')")
    assert page.input_value("#where") == "" and not page.is_checked("#collapse")


def test_more_like_this_searches_like_the_hit_without_it(page, server_url):
    page.goto(f"{server_url}/?q=a+close+up+of+a+tabby+cat")
    page.wait_for_selector("#grid figure.hit button.like")
    liked = page.locator("#grid figure.hit figcaption").first.inner_text().split()[-1]
    page.locator("#grid figure.hit button.like").first.click()
    page.wait_for_function("() => new URLSearchParams(location.search).has('like')")
    page.wait_for_function("() => document.getElementById('status').textContent !== 'searching...'")
    page.wait_for_selector("#grid figure.hit")
    names = [text.split()[-1] for text in page.locator("#grid figure.hit figcaption").all_inner_texts()]
    assert liked not in names and len(names) == 10, names  # every other photo, the liked one left out
    assert "more like image" in page.inner_text("#liking") and page.input_value("#q") == ""


def test_hits_that_match_poorly_are_set_apart_under_a_line(page, server_url):
    import httpx

    query = "a close up of a tabby cat"
    answer = httpx.get(f"{server_url}/api/search", params={"q": query, "k": 24}, timeout=120).json()
    weak = [hit["match"] is not None and hit["match"] < 0.5 for hit in answer["hits"]]
    page.goto(f"{server_url}/?q={query.replace(' ', '+')}")
    page.wait_for_selector("#grid figure.hit")
    classes = page.locator("#grid figure.hit").evaluate_all("figs => figs.map(f => f.classList.contains('weak'))")
    assert classes == weak
    line = page.locator("#weakline")
    if any(weak):  # the line sits right before the first hit that matches poorly
        assert line.count() == 1
        before = page.evaluate("() => document.getElementById('weakline').nextElementSibling.querySelector('figcaption').textContent")
        assert before.startswith(f"#{weak.index(True) + 1} ")
        assert ("No image matches well" in line.inner_text()) == weak[0]
    else:
        assert line.count() == 0
    # A text that matches nothing here: every re-ranked hit set apart, the line says so first.
    answer = httpx.get(f"{server_url}/api/search", params={"q": "zebra", "k": 24, "min_match": 0.5}, timeout=120).json()
    if not answer["hits"]:  # no hit reaches 0.5: the page must say that no image matches well
        page.goto(f"{server_url}/?q=zebra")
        page.wait_for_selector("#weakline")
        assert page.inner_text("#weakline").startswith("No image matches well")
