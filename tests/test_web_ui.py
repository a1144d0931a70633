"""The web chat page at ``/``, in a real browser: headless Chromium under selenium against a live server
with the shipped tiny Qwen3, guarded by an API key the page asks for.

One server and one browser for the module; each test opens the page on a fresh conversation. Replies of
the tiny model take well under a second, so the tests wait on what the page shows, never on fixed sleeps.
Without a browser (and without apt-get to install one) the browser tests skip, except in CI, which must
have one (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from qwen3.agent import calculator
from qwen3.engine.llm_engine import STOP_THINKING_TEXT
from qwen3.llm import LLM
from qwen3.server import ServerConfig, create_app
from qwen3.server.webui import page_url
from tests.browser import chromium, find_browser, set_viewport
from tests.live_server import LiveServer, live_server

API_KEY = "sk-web-ui-test"
MODEL = "qwen3-default"
TIMEOUT = 30.0  # seconds for anything the page shows (a reply of the tiny model takes well under one)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(None, kv_cache_memory="256MiB", progress=False)  # None: the shipped tiny model


@pytest.fixture(scope="module")
def server(llm) -> Iterator[LiveServer]:
    with live_server(llm, ServerConfig([MODEL], api_key=API_KEY)) as live:
        yield live


# ------------------------------------------------------------------------------ the page over plain HTTP


class _Links(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def test_page_and_files_come_from_this_server_alone(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
    parser = _Links()
    parser.feed(page.text)
    assert len(parser.links) >= 3 and all(link.startswith("/ui/") for link in parser.links), parser.links
    for link in parser.links:
        asset = httpx.get(server.url + link)
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == policy, link
    script = httpx.get(server.url + "/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/ui/missing.js").status_code == 404
    assert httpx.head(server.url + "/").status_code == 200  # curl -I works too
    # the page is public; the API behind it still needs the key
    assert httpx.get(server.base_url + "/models").status_code == 401
    models = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    assert "/" not in server.app.openapi()["paths"]  # API clients' schema is unchanged


def test_no_ui_leaves_only_the_api(llm):
    app = create_app(llm, ServerConfig([MODEL], web_ui=False))
    client = TestClient(app)  # no lifespan: routing only
    assert client.get("/").status_code == 404
    assert client.get("/ui/app.js").status_code == 404
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/"),
        ("0.0.0.0", "http://127.0.0.1:8000/"),
        ("::1", "http://[::1]:8000/"),
    ],
)
def test_page_url(host, url):
    assert page_url(host, 8000) == url


# ---------------------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser():
    if find_browser() is None:
        reason = "no chromium/chromedriver (scripts/setup.sh --test installs them with apt-get as root)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must test the page in a browser")
        pytest.skip(reason)
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The chat page in the browser, with the few actions and reads the tests need."""

    def __init__(self, driver: Any, server: LiveServer) -> None:
        self.driver = driver
        self.server = server

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert time.monotonic() < deadline, f"the page never showed {what}"
            time.sleep(0.02)

    def open(self, key: str | None = API_KEY) -> None:
        """Load the page with ``key`` stored (None: no key), on a new conversation."""
        self.driver.get(self.server.url + "/health")  # same origin: set the storage before the page runs
        self.js(
            "localStorage.clear(); if (arguments[0]) localStorage.setItem('qwen3.apiKey', arguments[0])", key
        )
        self.driver.get(self.server.url + "/")
        if key == API_KEY:
            self.wait(lambda: self.text("#model-name") == MODEL, "the model name")

    def find(self, css: str) -> Any:
        return self.driver.find_element("css selector", css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements("css selector", css)

    def text(self, css: str) -> str:
        found = self.all(css)
        return found[0].text if found else ""

    def fill(self, element_id: str, value: str) -> None:
        """Type into a settings field (opening the settings panel if it is closed)."""
        if not self.find("#settings").is_displayed():
            self.find("#open-settings").click()
        field = self.find(f"#{element_id}")
        field.clear()
        field.send_keys(value)

    def send(self, text: str) -> None:
        """Type a message and press Enter."""
        self.find("#prompt").send_keys(text + "\n")

    def replies(self) -> list[dict[str, Any]]:
        """Every assistant message as the page shows it."""
        return self.js(
            """return [...document.querySelectorAll('.msg.assistant')].map((m) => {
                const r = m.querySelector('.reasoning');
                return {state: m.dataset.state, content: m.querySelector('.content').textContent,
                        reasoning: r.hidden ? null : r.querySelector('.reasoning-text').textContent,
                        reasoningTokens: r.hidden ? null : Number(r.dataset.tokens), open: r.open,
                        summary: r.querySelector('summary').textContent,
                        stats: m.querySelector('.stats').textContent,
                        calls: [...m.querySelectorAll('.tool-call')].map((c) => ({
                            name: c.querySelector('.tool-name code').textContent,
                            arguments: c.querySelector('.tool-arguments').textContent,
                            result: c.querySelector('.tool-result').textContent}))};
            });"""
        )

    def user_messages(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('.msg.user .bubble')].map((b) => b.textContent)")

    def answer(self, count: int = 1) -> list[dict[str, Any]]:
        """Wait until the page shows ``count`` replies, all finished and none busy; return them."""

        def finished() -> list[dict[str, Any]] | None:
            replies = self.replies()
            busy = self.js("return document.body.classList.contains('busy')")
            done = len(replies) == count and all(r["state"] != "streaming" for r in replies)
            return replies if done and not busy else None

        return self.wait(finished, f"{count} finished replies")


@pytest.fixture
def page(browser, server) -> Page:
    page = Page(browser, server)
    page.open()
    return page


def test_thinking_reply_streams_reasoning_then_folds_it(page):
    page.fill("seed", "0")  # seeded: the same reply every run
    page.send("What is 347 + 589?")
    (reply,) = page.answer()
    assert reply["state"] == "done"
    assert "936" in reply["content"] and "936" in reply["reasoning"]
    assert not reply["open"]  # folded once the answer started
    assert reply["reasoningTokens"] > 10 and f"{reply['reasoningTokens']} tokens" in reply["summary"]
    assert re.search(r"Thought for \d+\.\d s", reply["summary"])
    completion = int(re.search(r"(\d+) tokens", reply["stats"]).group(1))
    assert completion > reply["reasoningTokens"] and "tok/s" in reply["stats"]
    # the page loaded nothing from another host, and nothing it did broke the Content-Security-Policy
    origin = page.server.url
    resources = page.js("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert resources and all(url.startswith(origin + "/") for url in resources), resources
    problems = [entry for entry in page.driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not problems, problems


def test_thinking_off_and_no_think_give_no_reasoning(page):
    page.find("#thinking").click()  # the hard switch
    assert page.find("#temperature").get_attribute("value") == "0.7"  # the non-thinking defaults
    assert page.find("#budget").get_attribute("disabled") is not None
    page.send("What is 347 + 589?")
    (reply,) = page.answer()
    assert reply["reasoning"] is None and re.search(r"347 \+ 589 = \d+", reply["content"])

    page.find("#new-chat").click()
    assert page.find("#thinking").is_selected()  # a new conversation starts in thinking mode
    page.fill("seed", "0")
    page.send("Which is larger, 9.11 or 9.9? /no_think")  # the soft switch, typed
    (reply,) = page.answer()
    assert reply["reasoning"] is None and "9.9" in reply["content"]


def test_thinking_budget_cuts_the_reasoning(page, llm):
    budget = 8
    page.find("#budget").send_keys(str(budget))
    page.send("Sort 5, 2, 9, 1, 7, 3.")
    (reply,) = page.answer()
    stop_text = STOP_THINKING_TEXT.split("</think>")[0].strip()
    assert reply["reasoning"].strip().endswith(stop_text)  # the engine's cut, shown as reasoning
    inserted = len(llm.tokenizer.encode(STOP_THINKING_TEXT))
    assert budget < reply["reasoningTokens"] <= budget + inserted
    assert reply["content"].strip()


def _running(server: LiveServer) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^qwen3_num_requests_running (\S+)$", text, re.M).group(1))


def test_escape_stops_a_long_reply_and_the_server_frees_it(page, llm, monkeypatch):
    step = llm.engine.step

    def slow_step():  # ~100 tokens/s, so the reply is surely still running when the test stops it
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    page.fill("max-tokens", "1500")
    page.fill("extra", '{"ignore_eos": true}')  # any field the server takes
    page.send("Sort 5, 2, 9, 1.")
    page.wait(lambda: page.replies() and page.replies()[0]["reasoning"], "streamed reasoning")
    assert page.replies()[0]["open"]  # the reasoning block is open while it is written
    assert _running(page.server) == 1
    assert page.find("#stop").is_displayed() and not page.find("#send").is_displayed()
    page.find("#prompt").send_keys("\ue00c")  # Escape
    (reply,) = page.answer()
    assert reply["state"] == "stopped" and "stopped" in reply["stats"]
    page.wait(lambda: _running(page.server) == 0, "the server's running count back at 0", timeout=10)
    page.server.wait_idle()
    assert int(re.search(r"(\d+) tokens", reply["stats"]).group(1)) < 1500
    assert page.find("#send").is_displayed()


def test_calculator_tool_round_trip_runs_in_the_page(page):
    page.find("#tools").click()
    page.fill("seed", "0")
    page.send("What is 347 * 58?")
    first, final = page.answer(2)
    (call,) = first["calls"]
    assert call["name"] == "calculator" and "347" in call["arguments"] and "58" in call["arguments"]
    assert call["result"] == "20126"
    assert "20126" in final["content"].replace(",", "")


def test_edit_regenerate_and_reload(page):
    page.fill("seed", "0")
    page.send("What is 347 + 589?")
    (first,) = page.answer()
    page.find(".msg.assistant .regenerate").click()
    (again,) = page.answer()
    assert again["content"] == first["content"] and "936" in again["content"]  # same seed, same answer

    page.find(".msg.user .edit").click()
    box = page.find(".edit-box")
    box.clear()
    box.send_keys("What is 12 + 30?\n")
    (edited,) = page.answer()
    assert page.user_messages() == ["What is 12 + 30?"] and "42" in edited["content"]

    page.driver.refresh()  # the conversation is kept in the browser
    page.wait(lambda: page.user_messages() == ["What is 12 + 30?"], "the conversation after a reload")
    (kept,) = page.answer()
    assert kept["content"] == edited["content"] and kept["reasoningTokens"] == edited["reasoningTokens"]
    assert page.find("#seed").get_attribute("value") == "0"  # and its settings
    page.find("#new-chat").click()
    assert page.user_messages() == []
    page.find("#conversations .open-conversation").click()
    assert page.user_messages() == ["What is 12 + 30?"]


def test_the_page_asks_for_the_api_key(page):
    page.open(key=None)
    dialog = page.wait(
        lambda: page.find("#key-dialog").is_displayed() and page.find("#key-dialog"), "the key dialog"
    )
    page.find("#api-key").send_keys("wrong\n")
    page.wait(lambda: "refused" in page.text("#key-error"), "the refusal")
    assert dialog.is_displayed() and page.text("#model-name") == ""
    field = page.find("#api-key")
    field.clear()
    field.send_keys(API_KEY + "\n")
    page.wait(lambda: page.text("#model-name") == MODEL, "the model name")
    assert not dialog.is_displayed()
    page.fill("seed", "0")
    page.send("What is 347 + 589?")
    (reply,) = page.answer()
    assert "936" in reply["content"]


def test_phone_sized_screen(page):
    set_viewport(page.driver, 390, 844, mobile=True)
    try:
        page.open()
        page.send("What is 347 + 589?")
        page.answer()
        right = "return document.getElementById('sidebar').getBoundingClientRect().right"
        assert page.js("return document.documentElement.scrollWidth") <= 390  # nothing sideways
        assert page.js(right) <= 0 and page.find("#toggle-sidebar").is_displayed()  # the list is a drawer
        page.find("#toggle-sidebar").click()
        page.wait(lambda: page.js(right) > 200, "the drawer")
        page.find("#prompt").send_keys("\ue00c")  # Escape closes it
        page.wait(lambda: page.js(right) <= 0, "the drawer closed")
        assert page.find("#send").is_displayed() and page.find("#prompt").rect["width"] > 200
    finally:
        set_viewport(page.driver, 1280, 860)


def _calculate(page: Page, expressions: list[str]) -> list[str]:
    """The page's own calculator tool (calculator.js) on each expression, run inside the page."""
    return page.driver.execute_async_script(
        """const [expressions, done] = arguments;
        import('/ui/calculator.js').then((m) => done(expressions.map(
            (e) => m.runCalculator(JSON.stringify({expression: e})))));""",
        expressions,
    )


def test_markdown_renders_model_text_as_text(page):
    text = (
        '<img src=x onerror="window.injected = 1"> **bold** and `<b>code</b>`\n'
        "```html\n<script>window.injected = 1</script>\n```\n"
        "- [bad](javascript:window.injected=1) [good](https://example.com/x)\n"
    )
    rendered = page.driver.execute_async_script(
        """const [text, done] = arguments;
        import('/ui/markdown.js').then((m) => {
            const box = document.createElement('div');
            m.renderMarkdown(text, box);
            document.body.append(box);
            done({tags: [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
                  text: box.textContent, strong: box.querySelector('strong').textContent,
                  code: box.querySelector('pre code').textContent,
                  links: [...box.querySelectorAll('a')].map((a) => a.href),
                  copy: box.querySelectorAll('.code-block button.copy').length,
                  injected: window.injected === 1});
        });""",
        text,
    )
    assert not {"img", "script", "b"} & set(rendered["tags"]), rendered["tags"]
    assert (
        '<img src=x onerror="window.injected = 1">' in rendered["text"] and "<b>code</b>" in rendered["text"]
    )
    assert rendered["strong"] == "bold" and rendered["code"] == "<script>window.injected = 1</script>"
    assert rendered["links"] == ["https://example.com/x"] and rendered["copy"] == 1
    assert not rendered["injected"]


def test_the_pages_calculator_answers_as_qwen3_agent_does(page):
    expressions = [
        "347 * 58", "2 ** 10", "2^10", "7 / 2", "-7 // 2", "-7 % 3", "7.5 // 2", "(1 + 2) * -3", "-2 ** 2",
        "2 ** -1", "12345678901234567890 * 98765", "1e3 + 0.5", "0.1 + 0.2", "1 / 3", "3 × 4", "0.00001 * 3",
    ]  # fmt: skip
    assert _calculate(page, expressions) == [calculator(e) for e in expressions]
    refused = ["alert(1)", "2 ** 1000", "1 / 0", "(1 + 2", "", "1 +", "constructor", "2 3"]
    assert all(result.startswith("Error: ") for result in _calculate(page, refused))
