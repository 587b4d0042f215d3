"""CallState: what one forward or `generate` call hands to an adapter's modules (task ids, masks), and the
values they compute once per prompt and reuse at every decoding step of the call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace

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

    row_fields = ("task_ids", "prompt_values")  # what a call keeps per batch row between its forwards

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
        self.resume(self.row_state().select(rows))

    def row_state(self) -> RowState:
        """What this call keeps per batch row (task ids, values computed once per prompt), to resume it later."""
        return RowState({name: _copied(getattr(self, name)) for name in self.row_fields})

    def resume(self, state: RowState) -> None:
        """Continue, in this call, the rows whose state is `state` (from `row_state`, possibly joined or selected):
        the next forward continues them through their key-value cache."""
        for name, value in state.values.items():
            setattr(self, name, _copied(value))

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


@dataclass
class RowState:
    """The per-row values of a call (`CallState.row_fields`, each a tensor with the batch first, a dict of them or a
    dataclass of them): what a sequence takes with it when it joins or leaves a running batch of a server."""

    values: dict[str, object]

    def select(self, rows: Tensor) -> RowState:
        """The state of batch rows `rows` (repeats allowed)."""
        selected = {name: _map_rows(lambda t: t[rows.to(t.device)], value) for name, value in self.values.items()}
        return type(self)(selected)

    @staticmethod
    def join(states: Sequence[RowState]) -> RowState:
        """The rows of `states` one after the other, as one batch."""
        first = states[0].values
        return RowState({name: _join([state.values[name] for state in states]) for name in first})


def _map_rows(function: Callable[[Tensor], Tensor], value):
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_rows(function, item) for key, item in value.items()}
    if is_dataclass(value):
        return replace(value, **{f.name: _map_rows(function, getattr(value, f.name)) for f in fields(value)})
    return value


def _join(values: list):
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, dict):
        if any(set(value) != set(first) for value in values):
            raise ValueError("rows of different adapters cannot join one batch: their per-prompt values differ")
        return {key: _join([value[key] for value in values]) for key in first}
    if is_dataclass(first):
        return replace(first, **{f.name: _join([getattr(value, f.name) for value in values]) for f in fields(first)})
    if first is None and any(value is not None for value in values):
        raise ValueError("rows with and without task ids cannot join one batch")
    return first


def _copied(value):
    """A shallow copy of a dict (so that resuming a state never lets a call change the state it came from)."""
    return dict(value) if isinstance(value, dict) else value
