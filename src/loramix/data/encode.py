"""Token ids for training and generation: chat template, loss on the answer only, context-side truncation."""

from __future__ import annotations

import torch

from loramix.data.base import Example


def _render(tokenizer, example: Example) -> tuple[str, str, str, str]:
    """(text before the prompt, the prompt, text after it up to the answer, the answer with its end of turn)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": example.prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": example.answer}], tokenize=False)
        if not whole.startswith(head):
            raise ValueError("the tokenizer's chat template renders the answer turn inconsistently")
        at = head.index(example.prompt)
        return head[:at], example.prompt, head[at + len(example.prompt) :], whole[len(head) :]
    eos = tokenizer.eos_token or ""
    return "", example.prompt, "\nAnswer: ", example.answer + eos


def encode_example(example: Example, tokenizer, max_length: int, with_answer: bool = True) -> dict:
    """input_ids, attention_mask and labels (-100 except on the answer) of an example, at most max_length tokens.

    Too long an input loses tokens from the start of the prompt (the context), never the template, the end of
    the prompt (question and instructions come last) or the answer; `truncated` says whether that happened.
    """
    before, prompt, after, answer = _render(tokenizer, example)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    head, body, tail = ids(before), ids(prompt), ids(after)
    target = ids(answer) if with_answer else []
    room = max_length - len(head) - len(tail) - len(target)
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt of {example.task} {example.id!r}")
    truncated = len(body) > room
    body = body[-room:]
    input_ids = head + body + tail + target
    labels = [-100] * (len(input_ids) - len(target)) + target
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels, "truncated": truncated}


def collate(rows: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded rows into tensors (labels padded with -100); rows' `task_id` become `task_ids`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; allowed: 'left', 'right'")
    length = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        pad = length - len(row["input_ids"])
        for key, value in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
            values = row.get(key, [-100] * len(row["input_ids"])) if key == "labels" else row[key]
            batch[key].append([value] * pad + values if padding_side == "left" else values + [value] * pad)
    tensors = {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}
    if all("task_id" in r for r in rows):
        tensors["task_ids"] = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
    return tensors
