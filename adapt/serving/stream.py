"""What of a row's text is settled while it is being denoised, so a stream only ever sends final text.

A masked-diffusion step commits tokens that never change again, so the decided left part of a row (up to
its first mask) is final token for token. Its text is final but for three tails held back until the row
is finished: a possible start of a stop string, an incomplete UTF-8 character (`\ufffd`), and text that
is no longer a prefix of what was sent (a tokenizer whose decoding of a prefix is not a prefix of the
decoding). A row whose decided part holds a stop token is finished before its batch is: its text is
exactly what the engine's `finish` gives it (cut at EOS, then at a stop string).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from adapt.sampling.engine import cut_at_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Final:
    """A finished row: its whole text and tokens, and why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens reached


def settled(text: str, stops: tuple[str, ...]) -> str:
    """`text` less any tail that a longer decided part could still cut or change."""
    cut = len(text)
    for s in stops:
        found = text.find(s)
        if found >= 0:
            cut = min(cut, found)
        for n in range(min(len(s) - 1, len(text)), 0, -1):  # the earliest start of s running off the end
            if text.endswith(s[:n]):
                cut = min(cut, len(text) - n)
                break
    return text[:cut].rstrip("\ufffd")


def finish_reason(tokens: list[int], gen_length: int) -> str:
    return "length" if len(tokens) >= gen_length else "stop"


class RowText:
    """One row's stream: feed it the row's generated region after every step; it says what to send."""

    def __init__(
        self, tokenizer: Any, eos_ids: set[int], mask_id: int, stops: tuple[str, ...], gen_length: int
    ) -> None:
        self.tokenizer, self.eos_ids, self.mask_id = tokenizer, eos_ids, mask_id
        self.stops, self.gen_length = stops, gen_length
        self.sent = ""
        self.decided = 0  # tokens of the decided part when last looked at
        self.final: Final | None = None

    def advance(self, region: list[int]) -> str:
        """New settled text of the row's region [start, end) (masks where undecided); "" when none.
        Sets `final` when a stop token in the decided part finishes the row."""
        if self.final is not None:
            return ""
        decided: list[int] = []
        for t in region:
            if t == self.mask_id:
                break
            if t in self.eos_ids:  # finished: the engine cuts here, then at the first stop string
                tokens, text = cut_at_stop(decided, self.tokenizer, self.stops)
                return self.finish(Final(text, tokens, "stop"))
            decided.append(t)
        if len(decided) == self.decided:
            return ""
        self.decided = len(decided)
        text = settled(self.tokenizer.decode(decided, skip_special_tokens=True), self.stops)
        return self._send(text)

    def finish(self, final: Final) -> str:
        """The rest of the text once the row is finished (the engine's own output for it)."""
        self.final = final
        if not final.text.startswith(self.sent):  # cannot be taken back: say so
            log.warning("a stream sent %d characters the final text does not start with", len(self.sent))
        return self._send(final.text)

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
