"""Token ids for training and generation: chat template, loss on the answer only, context-side truncation."""

from __future__ import annotations

import torch

from loramix.data.base import Example

PROMPT_SLOT = "<<loramix prompt>>"
ANSWER_SLOT = "<<loramix answer>>"
MIDDLE_CUT_FROM = 128  # prompt room (tokens) from which truncation cuts the middle rather than the start
KEPT_FROM_START = 0.25  # then: the share of the room kept from the prompt's start; the rest comes from its end
ELISION = " ... "  # marks a middle cut


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation of a prompt: a user message, after a system message when system_prompt is given (None
    keeps the chat template's own default, which for SmolLM2 is a 20-token introduction)."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": prompt}]


def template_parts(tokenizer, system_prompt: str | None = None) -> tuple[str, str, str, str]:
    """The texts around a prompt and its answer: (before the prompt, after it, before the answer, after the answer).

    With a chat template: the user's turn (after the system message of `chat_messages`) holds the prompt and the
    assistant's turn the answer; the first two parts make the generation prompt (add_generation_prompt=True), the
    last is the end of the assistant's turn without trailing white space (the eos token if the template ends the
    turn with nothing). Without one: "[system prompt\\n]prompt\\nAnswer: answer<eos>", the space before the answer
    being the answer's (as BPE vocabularies expect).
    """
    if not getattr(tokenizer, "chat_template", None):
        return system_prompt + "\n" if system_prompt else "", "\nAnswer:", " ", tokenizer.eos_token or ""
    user = chat_messages(PROMPT_SLOT, system_prompt)
    generation = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": ANSWER_SLOT}], tokenize=False)
    if not (isinstance(generation, str) and generation.count(PROMPT_SLOT) == 1 and whole.count(ANSWER_SLOT) == 1):
        raise ValueError("the tokenizer's chat template does not render one user and one assistant message as text")
    if not whole.startswith(generation):
        raise ValueError(
            "the tokenizer's chat template renders the assistant's turn differently from its generation prompt; "
            f"generation prompt {generation!r}, conversation {whole!r}"
        )
    before, after = generation.split(PROMPT_SLOT)
    answer_before, answer_after = whole[len(generation) :].split(ANSWER_SLOT)
    return before, after + answer_before, "", answer_after.rstrip() or (tokenizer.eos_token or "")


def encode_example(
    example: Example, tokenizer, max_length: int, with_answer: bool = True, system_prompt: str | None = None
) -> dict:
    """input_ids, attention_mask and labels (-100 except on the answer and its end of turn) of an example, at most
    max_length tokens, `truncated` and `dropped_turns`. with_answer=False gives the generation prompt alone (for
    evaluation). `system_prompt` as in `chat_messages`; an example's own system turn (first in its `context`)
    replaces it.

    A conversation's earlier turns come before the prompt, their assistant turns labelled when its `train_on` is
    "all". Too long a conversation loses its earliest user and assistant turns first (counted in `dropped_turns`),
    then prompt tokens, never template or answer ones: from the prompt's start, or when at least MIDDLE_CUT_FROM
    prompt tokens fit, from its middle (a quarter of what is kept comes from the start, the rest from the end,
    where questions and instructions are; " ... " marks the cut).
    """
    context = list(example.context)
    if context and context[0][0] == "system":
        system_prompt = context.pop(0)[1]
    dropped = 0
    while context:  # user and assistant turns in turn
        row = _encode_conversation(example, context, tokenizer, with_answer, system_prompt)
        if len(row["input_ids"]) <= max_length:
            return row | {"truncated": dropped > 0, "dropped_turns": dropped}
        context, dropped = context[2:], dropped + 2
    row = _encode_single(example, tokenizer, max_length, with_answer, system_prompt)
    return row | {"truncated": row["truncated"] or dropped > 0, "dropped_turns": dropped}


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_single(example: Example, tokenizer, max_length: int, with_answer: bool, system_prompt: str | None) -> dict:
    """One user turn and the answer (see encode_example)."""
    before, after, lead, end = template_parts(tokenizer, system_prompt)
    head, body, tail = (_token_ids(tokenizer, text) for text in (before, example.prompt, after))
    target = _token_ids(tokenizer, lead + example.answer + end) if with_answer else []
    room = max_length - len(head) - len(tail) - len(target)
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the prompt of {example.task} example {example.id!r}: "
            f"the template and answer alone take {max_length - room} tokens"
        )
    truncated = len(body) > room
    if truncated:
        elision = _token_ids(tokenizer, ELISION) if room >= MIDDLE_CUT_FROM else []
        kept = room - len(elision)
        start = int(kept * KEPT_FROM_START) if elision else 0
        body = body[:start] + elision + body[len(body) - (kept - start) :]
    input_ids = head + body + tail + target
    labels = [-100] * (len(input_ids) - len(target)) + target
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels, "truncated": truncated}


def _encode_conversation(
    example: Example, turns: list[tuple[str, str]], tokenizer, with_answer: bool, system_prompt: str | None
) -> dict:
    """Earlier user and assistant `turns`, the prompt and (with_answer) the answer, whole (see encode_example)."""
    messages = chat_messages(example.prompt, system_prompt)
    messages[-1:-1] = [{"role": role, "content": content} for role, content in turns]
    if with_answer:
        messages.append({"role": "assistant", "content": example.answer})
    last = len(messages) - 1
    labelled = {
        i for i, m in enumerate(messages) if m["role"] == "assistant" and (example.train_on == "all" or i == last)
    }
    input_ids, labels = [], []
    for text, scored in conversation_pieces(tokenizer, messages, labelled):
        ids = _token_ids(tokenizer, text)
        input_ids += ids
        labels += ids if scored else [-100] * len(ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def conversation_pieces(tokenizer, messages: list[dict[str, str]], labelled: set[int]) -> list[tuple[str, bool]]:
    """The chat template's text of `messages` as (text, labelled) pieces, the generation prompt last when the last
    message is not the assistant's. The assistant messages at the indices `labelled` are labelled from their
    content to their end of turn (without trailing white space; the eos token when the template ends a turn with
    nothing), as `template_parts` labels an answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a conversation with earlier turns needs a tokenizer with a chat template")

    def render(part: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation)

    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, whole = render(messages[:index], True), render(messages[: index + 1], False)
        if not (prompt.startswith(done) and whole.startswith(prompt)):
            raise ValueError(
                "the tokenizer's chat template renders a conversation's earlier turns differently once later turns "
                f"follow; conversation so far {whole!r}"
            )
        turn = whole[len(prompt) :].rstrip()
        end = (tokenizer.eos_token or "") if turn.endswith(message["content"].rstrip()) else ""
        pieces += [(prompt[len(done) :], False), (turn + end, index in labelled)]
        done = prompt + turn
    if messages[-1]["role"] != "assistant":
        prompt = render(messages, True)
        if not prompt.startswith(done):
            raise ValueError(f"the tokenizer's chat template renders the generation prompt {prompt!r} unlike the turns")
        pieces.append((prompt[len(done) :], False))
    return pieces


def collate(rows: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded rows into LongTensors: input_ids with pad_token_id, attention_mask with 0, labels with -100
    (rows without labels get -100 throughout); the rows' `task_id` (all or none of them) become `task_ids`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; allowed: 'left', 'right'")
    if not rows:
        raise ValueError("no rows to collate")
    with_task = sum("task_id" in row for row in rows)
    if with_task not in (0, len(rows)):
        raise ValueError(f"{with_task} of {len(rows)} rows have a task_id; give it to all rows or none")
    length = max(len(row["input_ids"]) for row in rows)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        pad = length - len(row["input_ids"])
        values = {
            "input_ids": (row["input_ids"], pad_token_id),
            "attention_mask": (row["attention_mask"], 0),
            "labels": (row.get("labels", [-100] * len(row["input_ids"])), -100),
        }
        for key, (sequence, filler) in values.items():
            padded = [filler] * pad + list(sequence) if padding_side == "left" else list(sequence) + [filler] * pad
            batch[key].append(padded)
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if with_task:
        tensors["task_ids"] = torch.tensor([row["task_id"] for row in rows], dtype=torch.long)
    return tensors
