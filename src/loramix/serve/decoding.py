"""One request while it decodes: `GenerationRequest` (what was asked), `Sequence` (its text, stop conditions,
sampler and listeners while it runs), `Completion` (what it gave), and `next_tokens`, the choice of every row's
next token from a step's logits (greedy, or sampled from the row's own seeded generator)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from collections.abc import Sequence as Rows
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loramix.serve.text import TextStream

MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationRequest:
    """One sequence to generate. `task` is the index of its tenant in the engine's task list; `logprobs` None
    for none, else how many of the most likely tokens to report beside each chosen one (0: the chosen alone)."""

    task: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    runner: Hashable | None = None  # the runner of an adapter served by name (None: the run's own)
    cancelled: bool = False  # set from another thread to stop generating this row


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and top-p), and the `top` most
    likely tokens of that step with theirs."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """What was generated for a request. finish_reason: "stop" (end of turn or stop string), "length" or
    "cancelled"; `token_ids` are the generated tokens without the end-of-turn token."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


TextListener = Callable[[str, list[TokenLogprob]], None]  # a text piece, and the logprobs of its new tokens
DoneListener = Callable[[Completion], None]
ErrorListener = Callable[[Exception], None]


class Sequence:
    """A request while it runs: its text so far (with stop strings), its sampler, the times of its tokens, and the
    listeners that receive its text pieces, its completion or its failure, as soon as each is known."""

    def __init__(
        self,
        request: GenerationRequest,
        tokenizer,
        eos_token_ids: Rows[int],
        device: torch.device,
        on_text: TextListener | None = None,
        on_done: DoneListener | None = None,
        on_error: ErrorListener | None = None,
    ) -> None:
        self.request = request
        self.eos = set(eos_token_ids)
        self.stream = TextStream(tokenizer, request.stop)
        self.on_text, self.on_done, self.on_error = on_text, on_done, on_error
        self.generator = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device).manual_seed(seed)
        self.logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self._reported = 0  # logprobs handed out with text pieces
        self.arrived = time.monotonic()
        self.token_times: list[float] = []
        self.completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None

    def advance(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the next generated token; finishes the sequence at its end of turn, stop string or token limit."""
        self.token_times.append(time.monotonic())
        if token in self.eos:
            self.finish("stop")
            return
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        self._emit(self.stream.push(token))
        if self.stream.stopped:
            self.finish("stop")
        elif len(self.stream.tokens) >= self.request.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the sequence ("stop", "length" or "cancelled") and hand out the rest of its text and its completion."""
        if self.finished:
            return
        self._emit(self.stream.finish(), final=True)
        logprobs = None if self.logprobs is None else list(self.logprobs)
        self.completion = Completion(
            self.stream.text, self.stream.tokens, reason, len(self.request.prompt_ids), logprobs
        )
        if self.on_done is not None:
            self.on_done(self.completion)

    def fail(self, error: Exception) -> None:
        """End the sequence with an error (its listeners get it instead of a completion)."""
        self.completion = Completion(self.stream.text, self.stream.tokens, "error", len(self.request.prompt_ids))
        if self.on_error is not None:
            self.on_error(error)

    def _emit(self, piece: str, final: bool = False) -> None:
        logprobs = []
        if self.logprobs is not None and (piece or final):
            logprobs, self._reported = self.logprobs[self._reported :], len(self.logprobs)
        if (piece or logprobs) and self.on_text is not None:
            self.on_text(piece, logprobs)


def next_tokens(logits: Tensor, sequences: Rows[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row of `logits` (B, V): the greedy choice, or a sample (temperature, top-p) from
    the row's own generator; and each row's log-probabilities where its request asked for them."""
    tokens = logits.argmax(-1)
    for row, sequence in enumerate(sequences):
        request = sequence.request
        if request.temperature > 0:
            probs = (logits[row].float() / request.temperature).softmax(-1)
            ordered, order = probs.sort(descending=True)
            ordered[ordered.cumsum(0) - ordered >= request.top_p] = 0  # keep the smallest set reaching top_p
            tokens[row] = order[torch.multinomial(ordered, 1, generator=sequence.generator)]
    chosen = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(sequences)
    wanted = [row for row, sequence in enumerate(sequences) if sequence.request.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        table = logits[rows].float().log_softmax(-1)
        top = max(sequences[row].request.logprobs for row in wanted)
        top_values, top_ids = table.topk(top, dim=-1) if top else (table[:, :0], table[:, :0].long())
        own = table.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for index, row in enumerate(wanted):
            count = sequences[row].request.logprobs
            pairs = list(zip(top_ids[index][:count], top_values[index][:count], strict=True))
            logprobs[row] = TokenLogprob(chosen[row], own[index], pairs)
    return chosen, logprobs
