"""Hooks into Hugging Face `generate` that let each row of a batch decode on its own terms.

`RowTracker` (a stopping criterion) follows every row as its tokens arrive: text, stop strings, the row's own
`max_tokens`, cancellation; it reports text pieces and finished rows at once. `RowSampler` (a logits
processor) samples the rows that asked for a temperature and leaves greedy rows untouched.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor, StoppingCriteria

from loramix.serve.text import TextStream


@dataclass
class GenerationRequest:
    """One sequence to generate. `task` is the index of its tenant in the engine's task list."""

    task: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: bool = False  # set from another thread to stop generating this row


@dataclass
class Completion:
    """What was generated for a request. finish_reason: "stop" (end of turn or stop string), "length" or
    "cancelled"; `token_ids` are the generated tokens without the end-of-turn token."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


TextListener = Callable[[int, str], None]
DoneListener = Callable[[int, Completion], None]


class RowTracker(StoppingCriteria):
    """Stops each row at its end of turn, stop string, token limit or cancellation, and reports its text."""

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        tokenizer,
        eos_token_ids: Sequence[int],
        on_text: TextListener | None = None,
        on_done: DoneListener | None = None,
    ) -> None:
        self.requests = requests
        self.eos = set(eos_token_ids)
        self.streams = [TextStream(tokenizer, request.stop) for request in requests]
        self.completions: list[Completion | None] = [None] * len(requests)
        self.on_text, self.on_done = on_text, on_done

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.completions[row] is None:
                self._advance(row, token)
        return torch.tensor([c is not None for c in self.completions], device=input_ids.device)

    def _advance(self, row: int, token: int) -> None:
        request, stream = self.requests[row], self.streams[row]
        if request.cancelled:
            reason = "cancelled"
        elif token in self.eos:
            reason = "stop"
        else:
            self._emit(row, stream.push(token))
            reason = "stop" if stream.stopped else "length" if len(stream.tokens) >= request.max_tokens else None
        if reason is not None:
            self._finish(row, reason)

    def _emit(self, row: int, piece: str) -> None:
        if piece and self.on_text is not None:
            self.on_text(row, piece)

    def _finish(self, row: int, reason: str) -> None:
        stream = self.streams[row]
        self._emit(row, stream.finish())
        completion = Completion(stream.text, stream.tokens, reason, len(self.requests[row].prompt_ids))
        self.completions[row] = completion
        if self.on_done is not None:
            self.on_done(row, completion)

    def finish_all(self) -> list[Completion]:
        """Close the rows `generate` ended without a decision (none normally) and return every completion."""
        for row, completion in enumerate(self.completions):
            if completion is None:
                self._finish(row, "length")
        return self.completions


class RowSampler(LogitsProcessor):
    """Samples the rows with temperature > 0 (with top-p, from the row's seed) by leaving only the sampled token
    possible, so that `generate`'s greedy choice picks it; greedy rows keep their scores."""

    def __init__(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        self.rows = [row for row, request in enumerate(requests) if request.temperature > 0]
        self.requests = requests
        self.generators = {
            row: torch.Generator(device).manual_seed(
                requests[row].seed if requests[row].seed is not None else random.getrandbits(63)
            )
            for row in self.rows
        }

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for row in self.rows:
            request = self.requests[row]
            probs = (scores[row] / request.temperature).softmax(-1)
            ordered, order = probs.sort(descending=True)
            ordered[ordered.cumsum(0) - ordered >= request.top_p] = 0  # keep the smallest set reaching top_p
            token = order[torch.multinomial(ordered, 1, generator=self.generators[row])]
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores
