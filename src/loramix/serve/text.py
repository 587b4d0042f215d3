"""TextStream: generated tokens -> text pieces, with stop strings, for streaming one sequence."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Decodes a sequence token by token and hands out text that can no longer change.

    Decoding uses a sliding window of tokens (as vLLM does) so that a piece is only released once its characters
    are complete (no trailing U+FFFD of a split multi-byte character). Text that could be the start of a stop
    string is held back until it is known not to be one; when a stop string appears, the text ends before it.
    The pieces joined equal `text`.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (cut before a stop string once one is found)
        self.stopped = False  # a stop string ended the text
        self._released = 0  # characters of `text` handed out
        self._window = 0  # first token of the decoding window
        self._read = 0  # tokens whose text is in `text`

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a generated token; return the text that became final (often empty)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._window : self._read])
        after = self._decode(self.tokens[self._window :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._window, self._read = self._read, len(self.tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence has ended: return the rest of its text, incomplete characters included."""
        if not self.stopped:
            before = self._decode(self.tokens[self._window : self._read])
            self.text += self._decode(self.tokens[self._window :])[len(before) :]
            self._read = len(self.tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        ends = [i for i in (self.text.find(s, self._released) for s in self.stop) if i >= 0]
        if ends:
            self.text, self.stopped = self.text[: min(ends)], True
            final = True
        end = len(self.text) if final else len(self.text) - self._stop_prefix()
        piece = self.text[self._released : max(end, self._released)]
        self._released += len(piece)
        return piece

    def _stop_prefix(self) -> int:
        """Length of the longest end of `text` that begins a stop string (text that must wait)."""
        tail = self.text[self._released :]
        return max(
            (n for s in self.stop for n in range(min(len(s) - 1, len(tail)), 0, -1) if tail.endswith(s[:n])),
            default=0,
        )
