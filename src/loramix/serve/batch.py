"""RunningBatch: the sequences that decode together on one runner, joining and leaving between decoding steps.

It holds what the rows share (their key-value cache, a RowCache) and what each row brings (its task id, its
RowState, its next input token). New prompts are processed in a forward of their own (`prefill`) and then
`join` the batch; rows that finish or are cancelled leave it after the step that ends them.
"""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch
from torch import Tensor
from transformers import DynamicCache

from loramix.call import RowState
from loramix.serve.decoding import Sequence, next_tokens
from loramix.serve.kv import RowCache
from loramix.serve.runners import Runner


class RunningBatch:
    """Rows of one runner that decode in one forward per step."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.sequences: list[Sequence] = []
        self.cache: RowCache | None = None
        self.state: RowState | None = None
        self.task_ids: Tensor | None = None
        self.next_ids: Tensor | None = None  # (B, 1) each row's last token, the input of the next step

    def __len__(self) -> int:
        return len(self.sequences)

    @classmethod
    def prefill(
        cls, runner: Runner, sequences: Rows[Sequence], pad_token_id: int, device: torch.device, config
    ) -> RunningBatch:
        """Process the prompts of `sequences` in one forward (left-padded) and choose their first tokens; the
        batch holds those that have not finished already."""
        length = max(len(sequence.request.prompt_ids) for sequence in sequences)
        input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            prompt = sequence.request.prompt_ids
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        task_ids = torch.tensor([sequence.request.task for sequence in sequences], device=device)
        cache = DynamicCache(config=config)
        logits, state = runner.forward(input_ids, mask, positions, cache, task_ids, None)
        batch = cls(runner)
        batch.sequences, batch.cache, batch.state, batch.task_ids = (
            list(sequences),
            RowCache(cache, mask),
            state,
            task_ids,
        )
        batch._take(logits)
        return batch

    def step(self) -> None:
        """One decoding step for every row; rows cancelled since the last step leave first."""
        for sequence in self.sequences:
            if sequence.request.cancelled:
                sequence.finish("cancelled")
        self._keep_unfinished()
        if not self.sequences:
            return
        mask, positions = self.cache.step_inputs()
        logits, self.state = self.runner.forward(
            self.next_ids, mask, positions, self.cache.cache, self.task_ids, self.state
        )
        self._take(logits)

    def join(self, other: RunningBatch) -> None:
        """Add the rows of `other` (of the same runner) after this batch's."""
        if not other.sequences:
            return
        if not self.sequences:
            self.sequences, self.cache, self.state = other.sequences, other.cache, other.state
            self.task_ids, self.next_ids = other.task_ids, other.next_ids
            return
        self.sequences = self.sequences + other.sequences
        self.cache = RowCache.join([self.cache, other.cache])
        self.state = None if self.state is None else type(self.state).join([self.state, other.state])
        self.task_ids = torch.cat([self.task_ids, other.task_ids])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])

    def fail(self, error: Exception) -> None:
        """Every row ends with `error`; the batch is empty afterwards."""
        for sequence in self.sequences:
            sequence.fail(error)
        self._keep_unfinished()

    def _take(self, logits: Tensor) -> None:
        tokens, logprobs = next_tokens(logits, self.sequences)
        for sequence, token, logprob in zip(self.sequences, tokens, logprobs, strict=True):
            sequence.advance(token, logprob)
        self.next_ids = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
        self._keep_unfinished()

    def _keep_unfinished(self) -> None:
        rows = [row for row, sequence in enumerate(self.sequences) if not sequence.finished]
        if len(rows) == len(self.sequences):
            return
        if not rows:
            self.sequences, self.cache, self.state, self.task_ids, self.next_ids = [], None, None, None, None
            return
        index = torch.tensor(rows, device=self.task_ids.device)
        self.sequences = [self.sequences[row] for row in rows]
        self.cache.keep(index)
        self.state = None if self.state is None else self.state.select(index)
        self.task_ids, self.next_ids = self.task_ids[index], self.next_ids[index]
