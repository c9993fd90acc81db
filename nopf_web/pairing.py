"""Pairing codes such as ``7-orbit-lantern``.

A code has two parts with different jobs:

- the **nameplate** (``7``): a short number the rendezvous allocates and uses
  to pair the two peers; it is all the rendezvous ever sees;
- two **words** chosen locally by the sharer from :data:`WORDS` (256 words,
  16 bits together): they never reach the rendezvous. The PAKE runs over the
  whole code, so a rendezvous (or anyone who learns the nameplate) cannot
  impersonate a peer without guessing the words online, once per claim.
"""

from __future__ import annotations

import difflib
import re
import secrets
from dataclasses import dataclass

from nopf_web.inputs import MAX_TEXT, InputError, is_ascii_digits, is_one_line, quote

from .pairing_words import WORDS

WORDS_PER_CODE = 2
_WORD_SET = frozenset(WORDS)
_SEPARATORS = re.compile(r"[\s\-]+")
MAX_NAMEPLATE = 999_999  # the wire's limit (nopf_web.wire.rendezvous.MAX_NAMEPLATE)


class BadCode(InputError):
    """Text that is not a valid pairing code (``field``: where it came from)."""

    def __init__(self, message: str, field: str = "code") -> None:
        super().__init__(field, message)


@dataclass(frozen=True)
class PairingCode:
    nameplate: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return "-".join([str(self.nameplate), *self.words])


def make_code(nameplate: int) -> PairingCode:
    """Complete a nameplate from the rendezvous with words drawn locally (CSPRNG)."""
    if not 1 <= nameplate <= MAX_NAMEPLATE:
        raise BadCode(f"nameplate {nameplate} is out of range (1-{MAX_NAMEPLATE})")
    return PairingCode(nameplate, tuple(secrets.choice(WORDS) for _ in range(WORDS_PER_CODE)))


def parse_code(text: str, field: str = "code") -> PairingCode:
    """Parse what a user typed: case, spaces and repeated hyphens are forgiven.

    The number is ASCII digits (as every number from outside: :mod:`nopf_web.inputs`),
    the words ASCII letters from :data:`WORDS`."""
    example = "a number and two words, like 7-orbit-lantern"
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise BadCode(f"a pairing code is {example}", field)
    if not is_one_line(text.strip()):
        raise BadCode(f"pairing code {quote(text.strip(), 60)} contains control or invalid "
                      "characters", field)
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    if not parts:
        raise BadCode(f"empty pairing code (expected {example})", field)
    head, words = parts[0], parts[1:]
    if not is_ascii_digits(head):
        raise BadCode(f"pairing code {quote(text.strip(), 60)} must start with a number "
                      f"({example})", field)
    if len(head) > len(str(MAX_NAMEPLATE)) or head.startswith("0"):
        raise BadCode(f"pairing code number {quote(head, 20)} is out of range "
                      f"(1-{MAX_NAMEPLATE})", field)
    if len(words) != WORDS_PER_CODE:
        raise BadCode(f"pairing code {quote(text.strip(), 60)} has {len(words)} word(s) after "
                      f"the number, expected {WORDS_PER_CODE} ({example})", field)
    for word in words:
        if word not in _WORD_SET:
            close = difflib.get_close_matches(word, WORDS, n=1, cutoff=0.75) \
                if word.isascii() and len(word) <= 20 else []
            hint = f" — did you mean {close[0]!r}?" if close else " — check the spelling"
            raise BadCode(f"{quote(word, 30)} is not a word nopf's pairing codes use{hint}",
                          field)
    return PairingCode(int(head), tuple(words))
