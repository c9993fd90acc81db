"""How many examples each fuzzed surface runs, and the hostile inputs they are drawn from.

CI runs each surface's small count (the whole fuzz suite well under a minute on
two cores). ``NOPF_FUZZ_EXAMPLES=N`` (the nightly size: 100000) runs N examples
on every surface instead; ``--hypothesis-show-statistics`` prints each surface's
count and time.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings, strategies as st

ENV = "NOPF_FUZZ_EXAMPLES"
NIGHTLY = 100_000


def examples(ci: int) -> int:
    """``ci`` examples, or the environment's count when set."""
    raw = os.environ.get(ENV, "")
    if raw.isascii() and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return ci


def fuzz(ci: int) -> settings:
    """Hypothesis settings of one surface: ``ci`` examples in CI, ``$NOPF_FUZZ_EXAMPLES``
    when set. No deadline (a loaded CI machine is slow, not wrong); no example
    database (runs are independent)."""
    return settings(max_examples=examples(ci), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# Pieces that have broken parsers before, or break naive ones: digits int() refuses
# (superscripts) or reads (other scripts), controls, separators, lone surrogates,
# signs, exponents, huge numbers, and pieces of valid input to get deeper.
PIECES = (
    "²", "³", "¹", "٣", "１", "߀", "𝟘", "Ⅻ", "½", "\x00", "\n", "\r", "\t", " ", "\u2028",
    "\u200b", "\ufeff", "\xa0", "\ud800", "\udfff", "\udc80", "-", "+", "_", ".", ":", "[",
    "]", "%", "e", "E", "inf", "nan", "0x1f", "0", "1", "8080", "65535", "65536", "-1",
    "99999999999999999999999999999", "1e3", "1.2.3.4", "127.0.0.1", "::1", "[::1]",
    "7-orbit-lantern", "'", '"', "\\", "{", "}", "&", "=", ";", "/", "?", "#", "ǅ", "İ",
)

# Full Unicode, surrogates included (hypothesis leaves them out by default).
any_char = st.characters(exclude_categories=())
nasty_text = st.one_of(
    st.text(alphabet=any_char, max_size=40),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(alphabet=any_char, max_size=3)),
             max_size=10).map("".join),
    st.integers().map(str),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats().map(str),
    st.sampled_from(PIECES),
)


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(
        min_value=-(10**60), max_value=10**60), st.floats(allow_nan=False,
                                                            allow_infinity=False),
        nasty_text)
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)),
        max_leaves=12)


json_values = _json_values()


def deeply_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Raw bodies: JSON and not, malformed, deep, duplicate keys, NaN, bad UTF-8.
raw_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.integers(min_value=1, max_value=100_000).map(deeply_nested),
    st.integers(min_value=1, max_value=5000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.sampled_from([b'{"role":"server","role":"client","local_port":1}', b'{"a":NaN}',
                     b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":1e999999}',
                     b'{"a":' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}", b'"\\ud800"',
                     b'{"label":"\\ud800"}', b'{"role":"server","local_port":"\\u00b2"}',
                     b"\xff", b"", b"{}" * 100]),
)
