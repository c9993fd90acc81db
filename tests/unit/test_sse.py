"""The live page's server-sent events: wire format and change tracking, without sockets."""

from __future__ import annotations

import base64
from collections import deque

from hypothesis import given, settings, strategies as st

from nopf_web.sessions.engine import Event
from nopf_web.web.sse import (
    LINE,
    LiveState,
    LogEntry,
    Message,
    encode_comment,
    encode_event,
    encode_retry,
)

NAMES = ("state", "bytes_in", "stop")
PARTS = {"state": "<b>waiting</b>", "bytes_in": "0 B", "stop": "<form></form>"}


def parse(stream: bytes) -> list[tuple[str, str, str | None]]:
    """(event, data, id) per dispatched event, as a browser's EventSource parses them."""
    out: list[tuple[str, str, str | None]] = []
    name, data, event_id = "message", list[str](), None
    text = stream.decode()
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                out.append((name, "\n".join(data), event_id))
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    return out


def render(entry: LogEntry) -> str | None:
    return None if entry.kind == "code" else f"<li>{entry.message}</li>"


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_data_of_any_lines_arrives_whole(data: str) -> None:
    wire = encode_event("state", data, "tok") + encode_comment("keepalive") \
        + encode_event("end", "x")
    normal = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse(wire) == [("state", normal, "tok"), ("end", "x", "tok")]


def test_retry_and_comments_dispatch_nothing() -> None:
    assert encode_retry(2000) == b"retry: 2000\n\n"
    assert parse(encode_retry(2000) + encode_comment("keepalive")) == []


def test_the_first_update_sends_every_part_then_only_changes() -> None:
    state = LiveState(NAMES)
    first = state.update(PARTS, [], render)
    assert [(m.name, m.data) for m in first] == list(PARTS.items())
    assert state.update(PARTS, [], render) == []
    changed = state.update({**PARTS, "bytes_in": "1.0 KiB"}, [], render)
    assert [(m.name, m.data) for m in changed] == [("bytes_in", "1.0 KiB")]
    assert changed[0].token == state.token()
    back = state.update(PARTS, [], render)  # a change back is a change too
    assert [(m.name, m.data) for m in back] == [("bytes_in", "0 B")]


def test_each_message_carries_the_state_once_it_is_applied() -> None:
    state = LiveState(NAMES)
    log = [Event("log", "one", at=1.0), Event("log", "two", at=2.0)]
    messages = state.update(PARTS, log, render)
    for i, message in enumerate(messages):
        # A browser that got only the first i+1 events reconnects with that event's id:
        # it is sent exactly the rest.
        resumed = LiveState.from_token(NAMES, message.token)
        assert resumed.update(PARTS, log, render) == [
            Message(m.name, m.data, m.token) for m in messages[i + 1:]]


def test_a_token_restores_what_the_page_shows() -> None:
    log = [Event("log", "one", at=1.0)]
    page = LiveState(NAMES)
    page.update(PARTS, log, render)
    state = LiveState.from_token(NAMES, page.token())
    assert state.update(PARTS, log, render) == []
    log.append(Event("state", "two", at=2.0))
    assert [(m.name, m.data) for m in state.update({**PARTS, "stop": ""}, log, render)] == [
        ("stop", ""), (LINE, "<li>two</li>")]


def test_a_bad_or_foreign_token_means_send_everything() -> None:
    good = LiveState(NAMES)
    good.update(PARTS, [], render)
    other_layout = LiveState(("state", "bytes_in", "stopped"))
    other_layout.update(PARTS | {"stopped": ""}, [], render)
    for token in (None, "", "!!!", "a", good.token()[:-4],
                  base64.urlsafe_b64encode(b"\0" * 40).decode(), other_layout.token()):
        state = LiveState.from_token(NAMES, token)
        assert [m.name for m in state.update(PARTS, [], render)] == list(NAMES), token


def test_log_entries_are_recognised_by_content_when_they_are_new_objects() -> None:
    state = LiveState(NAMES)
    state.update(PARTS, [Event("log", "one", at=1.0)], render)
    copies = [Event("log", "one", at=1.0), Event("log", "two", at=2.0)]
    assert [m.data for m in state.update(PARTS, copies, render)] == ["<li>two</li>"]


# One step: append this many entries to the log (a bounded deque), or -1: the page
# sends an update, or -2: the browser reconnects with the last token it got.
steps = st.lists(st.one_of(st.integers(1, 12), st.just(-1), st.just(-2)), max_size=40)


@settings(max_examples=300)
@given(steps, st.integers(1, 8))
def test_each_log_entry_is_sent_once_in_order_even_as_the_deque_wraps(
        plan: list[int], maxlen: int) -> None:
    log: deque[Event] = deque(maxlen=maxlen)
    state = LiveState(NAMES)
    state.update(PARTS, [], render)
    token = state.token()
    appended = 0
    newest_seen = -1  # index (in append order) of the newest entry the page has
    sent: list[str] = []
    for step in plan:
        if step == -2:
            state = LiveState.from_token(NAMES, token)
            continue
        if step > 0:
            for _ in range(step):
                # A "code" entry is counted as seen but never shown.
                log.append(Event("code" if appended % 5 == 4 else "log", f"entry {appended}",
                                 at=1000.0 + appended))
                appended += 1
            continue
        messages = state.update(PARTS, list(log), render)
        if messages:
            token = messages[-1].token
        lines = [m.data for m in messages if m.name == LINE]
        # Exactly the entries newer than the newest shown (older ones left unseen are gone).
        expected = [render(e) for e in log if int(e.message.split()[1]) > newest_seen]
        assert lines == [x for x in expected if x is not None]
        sent += lines
        if log:
            newest_seen = int(log[-1].message.split()[1])
    assert len(sent) == len(set(sent))  # nothing sent twice
