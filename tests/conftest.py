"""Shared pytest fixtures. Each returns a fresh object per test, so a test may modify what it gets."""

import json

import pytest
import torch

import loramix.evaluate
from loramix.models import tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def own_zero_shot_cache(tmp_path_factory, monkeypatch):
    """Every test keeps its zero-shot scores to itself, not in the machine's shared cache."""
    path = tmp_path_factory.mktemp("zero-shot-cache") / "zero_shot.json"
    monkeypatch.setattr(loramix.evaluate, "shared_zero_shot_path", lambda: path)
    return path


# ---- models ---------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_llama_model():
    """`tiny_llama()` (vocabulary 128, hidden 32, 2 layers, seed 0) in eval mode."""
    return tiny_llama().eval()


@pytest.fixture
def tiny_gpt2_model():
    """`tiny_gpt2()` (vocabulary 128, hidden 32, 2 layers, seed 0) in eval mode."""
    return tiny_gpt2().eval()


# ---- batches --------------------------------------------------------------------------------------------------
TINY_BATCH_LENGTHS = (10, 7, 5)
TINY_PROMPT_LENGTH = 4


@pytest.fixture
def tiny_batch():
    """3 rows of 10 random ids (seed 0) below 128, right-padded with id 0 to lengths 10, 7 and 5.

    labels copy input_ids, with -100 on the padding and on the first 4 tokens of each row (the "prompt").
    """
    input_ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = (torch.arange(10) < torch.tensor(TINY_BATCH_LENGTHS)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :TINY_PROMPT_LENGTH] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- data -----------------------------------------------------------------------------------------------------
@pytest.fixture
def task_file(tmp_path):
    """Two tiny tasks (40 examples each): is a number even or odd?"""
    path = tmp_path / "parity.jsonl"
    rows = [
        {"task": task, "prompt": f"{n}?", "answer": "even" if n % 2 == 0 else "odd", "choices": ["even", "odd"]}
        for task in ("parity", "parity2")
        for n in range(40)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
