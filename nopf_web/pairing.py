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

from nopf_web.errors import NopfError

from .pairing_words import WORDS

WORDS_PER_CODE = 2
_WORD_SET = frozenset(WORDS)
_SEPARATORS = re.compile(r"[\s\-]+")
MAX_NAMEPLATE = 999_999  # the wire's limit (nopf_web.wire.rendezvous.MAX_NAMEPLATE)


class BadCode(NopfError):
    """Text that is not a valid pairing code."""


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


def parse_code(text: str) -> PairingCode:
    """Parse what a user typed: case, spaces and repeated hyphens are forgiven."""
    parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
    example = "a number and two words, like 7-orbit-lantern"
    if not parts:
        raise BadCode(f"empty pairing code (expected {example})")
    head, words = parts[0], parts[1:]
    if not head.isdigit() or not head.isascii():
        raise BadCode(f"pairing code {text.strip()!r:.60} must start with a number ({example})")
    if len(head) > len(str(MAX_NAMEPLATE)) or head.startswith("0"):
        raise BadCode(f"pairing code number {head!r:.20} is out of range (1-{MAX_NAMEPLATE})")
    if len(words) != WORDS_PER_CODE:
        raise BadCode(f"pairing code {text.strip()!r:.60} has {len(words)} word(s) after the "
                      f"number, expected {WORDS_PER_CODE} ({example})")
    for word in words:
        if word not in _WORD_SET:
            close = difflib.get_close_matches(word, WORDS, n=1, cutoff=0.75)
            hint = f" — did you mean {close[0]!r}?" if close else " — check the spelling"
            raise BadCode(f"{word!r:.30} is not a word nopf's pairing codes use{hint}")
    return PairingCode(int(head), tuple(words))
