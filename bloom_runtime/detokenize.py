"""Text of a sequence as its tokens come, in constant work per token, with stop strings.

A byte-level BPE token may end inside a UTF-8 character, so a token's text is known only
once the character is whole. `Detokenizer` decodes a short window of tokens: those since the
last point where the text was whole (`_prefix`) up to the newest; the window's text beyond
what was already shown is the new text, once it no longer ends in U+FFFD (a partial
character). So each token costs a decode of a few tokens, never of the whole sequence.

Stop strings are searched in the tail only: a stop string not found before the new text can
only end inside it, so the search starts `longest stop - 1` characters before it. While a
sequence runs, its last `longest stop - 1` characters are held back (`visible`), because
they may be the start of a stop string; they are shown once the sequence finishes.

`Engine.stream_text` / `generate_text` and the server share it; neither re-decodes a sequence.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what decoding yields for bytes of a character not yet complete


class Detokenizer:
    """One sequence's text: `add` tokens, read `text` (settled) or `visible` (safe to show)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string was found: `text` ends before it, and takes no more
        self._prefix = 0  # tokens[_prefix:_read] decode to the end of `text`
        self._read = 0

    def add(self, token: int) -> bool:
        """Take the next token; True when a stop string has appeared (the text is cut before it)."""
        if self.stopped:
            return True
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix:self._read])
        window = self.decode(self.tokens[self._prefix:])
        if len(window) > len(before) and not window.endswith(REPLACEMENT):
            self._extend(window[len(before):])
            self._prefix, self._read = self._read, len(self.tokens)
        return self.stopped

    def flush(self) -> str:
        """The sequence has ended: take what is left of a partial character, and return the text."""
        if not self.stopped and self._read < len(self.tokens):
            before = self.decode(self.tokens[self._prefix:self._read])
            self._extend(self.decode(self.tokens[self._prefix:])[len(before):])
            self._prefix = self._read = len(self.tokens)
        return self.text

    @property
    def visible(self) -> str:
        """The text that can be shown while the sequence runs: without the characters that may
        begin a stop string (all of it once stopped)."""
        if self.stopped or not self.hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]

    def _extend(self, new: str) -> None:
        start = max(0, len(self.text) - self.hold)
        self.text += new
        if not self.stops:
            return
        tail = self.text[start:]
        found = [i for i in (tail.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[: start + min(found)]
            self.stopped = True
