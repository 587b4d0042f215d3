"""A run folder, as `loramix train` writes it and everything else reads it: its recipe, splits, adapter and
checkpoint. Evaluation, the harness model, the server, export and a continuing run load a run through it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from torch import nn

from loramix.data import SPLIT_SEED, Example, get_task
from loramix.files import read_json
from loramix.model import load
from loramix.models import DEFAULT_MODEL, QUANTIZATIONS

PEFT_CONFIG_NAME = "adapter_config.json"  # what marks a peft adapter folder


@dataclass
class SavedRecipe:
    """What a run's recipe.yaml says of its base model, tasks and adapter, read without validating the whole
    recipe (which needs the run's data): enough to serve the run or to continue it. A task's id is its position
    in `tasks`; `system_prompt` is None where the run kept the chat template's default."""

    model: str
    tasks: list[str]
    system_prompt: str | None
    quantization: str | None
    method: str  # `lora` (peft), `mixlora` or a loramix method's name
    mixlora: dict | None  # the `mixlora:` section of a mixture's run


class RunFolder:
    """The files of one run: recipe.yaml, splits.json, adapter/, checkpoint/, and the records and scores beside
    them (history.jsonl, learning_curve.jsonl, training.json, metrics.json, ...)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe_file = self.path / "recipe.yaml"
        self.adapter_dir = self.path / "adapter"
        self.checkpoint_dir = self.path / "checkpoint"

    def read_json(self, name: str) -> dict:
        """One of the run's JSON files ({} while the run has not written it)."""
        return read_json(self.path / name, default={})

    def saved_recipe(self) -> SavedRecipe:
        """The base model, tasks and adapter of recipe.yaml (`SavedRecipe`), checked; ValueError names the file."""
        path = self.recipe_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {self.path} a run folder written by `loramix train`?")
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} must hold a mapping of recipe keys, got {recipe!r}")
        tasks = recipe.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"{path}: `tasks` must be a non-empty list of task names, got {tasks!r}")
        model = recipe.get("model") or DEFAULT_MODEL
        if not isinstance(model, str):
            raise ValueError(f"{path}: `model` must be a model name or path, got {model!r}")
        system_prompt = recipe.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"{path}: `system_prompt` must be text or null, got {system_prompt!r}")
        quantization = recipe.get("quantization")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"{path}: `quantization` must be one of {QUANTIZATIONS}, got {quantization!r}")
        mixlora, lora = recipe.get("mixlora"), recipe.get("lora")
        method = "lora" if lora is not None else "mixlora" if mixlora is not None else str(recipe.get("method"))
        return SavedRecipe(model, tasks, system_prompt, quantization, method, mixlora)

    def require_adapter(self) -> Path:
        """adapter/, or FileNotFoundError when the run has not finished training."""
        if not self.adapter_dir.is_dir():
            raise FileNotFoundError(f"{self.adapter_dir} is missing: is {self.path} a finished `loramix train` run?")
        return self.adapter_dir

    def load_adapter(self, model: nn.Module) -> nn.Module:
        """The base model with the run's adapter: a peft adapter if adapter/ holds one, else loramix's."""
        adapter = self.require_adapter()
        if (adapter / PEFT_CONFIG_NAME).is_file():
            from peft import PeftModel

            return PeftModel.from_pretrained(model, adapter)
        return load(model, adapter)

    def examples(self, name: str, data_dir: str | Path | None, max_examples: int | None) -> tuple[list, list]:
        """(train, test) examples of a task as training used them (splits.json's indices), test capped at
        `max_examples`; ValueError when the task's data changed since."""
        return split_examples(name, self.read_json("splits.json"), data_dir, max_examples)


def split_indices(
    tasks: list[str], evaluation: list[str], data_dir: str | Path | None, dev_examples: int
) -> dict[str, dict]:
    """splits.json: per task (trained or evaluated), the split sizes and the indices used; the test indices are a
    seeded permutation, so that evaluating the first `eval_examples` scores a random, reproducible subset. With
    `dev_examples`, a trained task's "dev" indices (the last ones of a seeded permutation of its train split,
    for the learning curve) are left out of its "train" indices, which are all that training draws."""
    splits = {}
    for name in dict.fromkeys([*tasks, *evaluation]):
        loaded = get_task(name).load(data_dir)
        test = np.random.default_rng(SPLIT_SEED).permutation(len(loaded.get("test", []))).tolist()
        size, held_out = len(loaded.get("train", [])), dev_examples if name in tasks else 0
        indices = {"train": list(range(size)), "test": test}
        if held_out:
            if held_out >= size:
                raise ValueError(
                    f"recipe key dev_examples={held_out} is invalid: task {name!r} has {size} training examples; "
                    "expected fewer, so that some are left to train on"
                )
            order = np.random.default_rng(SPLIT_SEED).permutation(size).tolist()
            indices |= {"train": sorted(order[:-held_out]), "dev": order[-held_out:]}
        splits[name] = {
            "seed": SPLIT_SEED,
            "sizes": {split: len(examples) for split, examples in loaded.items()},
            "indices": indices,
        }
    return splits


def split_examples(
    name: str, splits: dict, data_dir: str | Path | None, max_examples: int | None
) -> tuple[list[Example], list[Example]]:
    """(train, test) examples of a task by `splits` (splits.json), test capped at max_examples."""
    loaded = get_task(name).load(data_dir)
    recorded = splits.get(name, {})
    for split, size in recorded.get("sizes", {}).items():
        if len(loaded.get(split, [])) != size:
            raise ValueError(
                f"task {name!r}: its {split} split has {len(loaded.get(split, []))} examples, but {size} when the "
                "run was trained (splits.json): the data changed, so the run's test examples cannot be found"
            )
    indices = recorded.get("indices", {})
    train, test = (
        [loaded[split][i] for i in indices[split]] if split in indices else list(loaded.get(split, []))
        for split in ("train", "test")
    )
    if not test:
        raise ValueError(f"task {name!r} has no test examples (data folder: {data_dir or 'the default'})")
    return train, test if max_examples is None else test[:max_examples]
