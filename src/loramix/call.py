"""CallState: what one forward or `generate` call hands to an adapter's modules (task ids, masks), and the
values they compute once per prompt and reuse at every decoding step of the call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class CallState:
    """The inputs of the current call, shared by every module of one adapted model.

    `prompt_values` holds, during a `generate` call (`generating`), what modules compute once from the prompt
    (pooled routes, generated vectors, soft tokens), keyed by the module; it follows the batch's rows through
    `select_rows` and is forgotten when the next call starts.
    """

    task_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    prompt_mask: Tensor | None = None
    generating: bool = False
    prompt_values: dict[object, Tensor] = field(default_factory=dict)

    def start_call(self, task_ids: Tensor | None, prompt_mask: Tensor | None, generating: bool) -> None:
        """Set the inputs of a forward or `generate` call and forget what the previous call computed."""
        self.task_ids, self.prompt_mask, self.generating = task_ids, prompt_mask, generating
        self.prompt_values.clear()

    def new_forward(self, attention_mask: Tensor | None) -> None:
        """A forward of the base model starts (one per decoding step of `generate`)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = current_tokens(attention_mask)
        self.attention_mask = attention_mask

    def select_rows(self, rows: Tensor) -> None:
        """Continue this call on the batch rows `rows` (repeats allowed): the task ids and the values computed
        once per prompt follow their rows, as when several continuations of one prompt are scored."""
        if self.task_ids is not None:
            self.task_ids = self.task_ids[rows.to(self.task_ids.device)]
        for key, value in self.prompt_values.items():
            self.prompt_values[key] = value[rows.to(value.device)]

    def once_per_prompt(self, key: object, compute: Callable[[], Tensor]) -> Tensor:
        """`compute()`, or, while generating, the value it gave on the prompt (the call's first forward)."""
        if not self.generating:
            return compute()
        value = self.prompt_values.get(key)
        if value is None:
            value = self.prompt_values[key] = compute()
        return value

    def token_mask(self, x: Tensor) -> Tensor:
        """(B, T) bool mask of the real (non-padding) tokens among the T tokens of x."""
        batch, length = x.shape[:2]
        mask = self.attention_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return torch.ones(batch, length, dtype=torch.bool, device=x.device)
        return mask[:, -length:].bool()

    def pooling_mask(self, x: Tensor) -> Tensor:
        """(B, T) bool mask of the prompt tokens that prompt-level modules pool over.

        The prompt mask given to the forward (in training: non-padding tokens without labels), else the
        attention mask. A row with no prompt token pools over all its real tokens.
        """
        tokens = self.token_mask(x)
        prompt = self.prompt_mask
        if prompt is None or prompt.shape != tokens.shape:
            return tokens
        prompt = prompt.bool() & tokens
        return torch.where(prompt.any(-1, keepdim=True), prompt, tokens)

    def task_ids_for(self, batch: int) -> Tensor:
        """The task ids, repeated if `generate` expanded the batch (beams, several return sequences)."""
        if self.task_ids is None:
            raise ValueError("this adapter needs task ids: pass task_ids=LongTensor of shape (batch,)")
        ids = self.task_ids
        if ids.shape[0] != batch:
            if batch % ids.shape[0]:
                raise ValueError(f"task_ids has {ids.shape[0]} rows but the batch has {batch}")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        return ids


def current_tokens(mask: Tensor) -> Tensor | None:
    """(B, Q) the real tokens among the Q of a forward, from its 4-D attention mask (B, 1 or heads, Q, K), boolean
    or additive, as `generate` passes it with a static key-value cache (whose K slots include those not yet
    filled). Keys that no query attends are padding or empty slots; the forward's own tokens are the last Q
    attended ones. None (every token real) for a decoding step (Q = 1), which continues each row with a real
    token: a compiled decoding step then reads no mask at all."""
    queries = mask.shape[-2]
    if queries == 1:
        return None
    attended = (mask if mask.dtype == torch.bool else mask == 0).any(-2).any(1)  # (B, K)
    end = int(attended.nonzero()[:, 1].max()) + 1 if attended.any() else mask.shape[-1]
    return attended[:, max(end - queries, 0) : end]
