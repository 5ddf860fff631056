"""Streaming text out of token pieces, safely.

A token's bytes may end in the middle of a UTF-8 character (emoji and CJK
often span tokens). An incremental decoder holds such bytes back until the
character is complete. Stop strings are held back the same way: text that
could be the start of a stop string is not shown until it is known not to be.
"""

from __future__ import annotations

import codecs


class StreamDetokenizer:
    """Feed token bytes, get displayable text; `stopped` turns True at a stop string."""

    def __init__(self, stop: tuple[str, ...] | list[str] = ()):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet shown (could begin a stop string)
        self.text = ""  # everything shown so far
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Return the text that is now safe to show (maybe "")."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: show whatever is held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        cut = len(held)
        for s in self._stop:
            i = held.find(s)
            if i != -1 and i < cut:
                cut = i
                self.stopped = True
        if not self.stopped and not final:
            cut = len(held) - _longest_stop_prefix_suffix(held, self._stop)
        out, self._held = held[:cut], ("" if self.stopped else held[cut:])
        self.text += out
        return out


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
