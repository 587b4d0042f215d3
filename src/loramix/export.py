"""Export one task of a `task`-router (MOELoRA) model as a standard peft LoRA adapter.

With the task router the expert weights w_t depend on the task alone, so task t's update is an ordinary
LoRA of the total rank R = n r:  Delta W_t = scale * [w_{t,1} B_1 ... w_{t,n} B_n] [A_1; ...; A_n].
The task weights are folded into B and peft's scaling lora_alpha / R is made equal to `scale`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramix.card import hub_id, model_card, run_card_scores, write_card
from loramix.config import PAPERS
from loramix.model import MixLoraModel
from loramix.models import load_model
from loramix.recipe import load_recipe
from loramix.run_folder import PEFT_CONFIG_NAME, RunFolder

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_key(module: str, factor: str) -> str:
    """peft's saved name of a LoRA factor ('A' or 'B') of `module` (named as in the base model)."""
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def peft_target_modules(model: nn.Module, modules: list[str]) -> list[str]:
    """peft `target_modules` selecting exactly `modules` of `model`: their last name parts when those match
    no other module (as peft writes them), else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
    matched = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matched == set(modules) else sorted(modules)


def base_model_name(model: nn.Module) -> str | None:
    """The name or path of a Hugging Face model as peft records it (None for a model built from a config)."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_peft_adapter(directory: str | Path, factors: dict[str, tuple[Tensor, Tensor]], config: LoraConfig) -> Path:
    """Write a peft LoRA adapter: adapter_config.json and adapter_model.safetensors.

    `factors` maps each module name (in the base model) to (A (r, d_in), B (d_out, r)).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[peft_key(module, "A")] = a.detach().cpu().contiguous()
        tensors[peft_key(module, "B")] = b.detach().cpu().contiguous()
    save_file(tensors, directory / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    return directory


def _require_task_router(router: str) -> None:
    if router != "task":
        raise ValueError(
            f"per-task export needs router='task' (MOELoRA), whose expert weights depend on the task alone; "
            f"this model uses router={router!r}, whose expert weights change with the input"
        )


@torch.no_grad()
def task_factors(model: MixLoraModel, task_id: int) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """Task `task_id`'s update of a `task`-router model as LoRA factors: ({module: (A (n r, d_in), B (d_out, n r))},
    scale), so that the update of each module is scale * B A."""
    _require_task_router(model.mixlora_config.router)
    weights = model.task_weights(task_id)  # validates task_id
    used = task_experts(model, task_id)
    factors = {}
    scales = set()
    for name, layer in model.layers.items():
        lora_A, lora_B = (tensor[:used] for tensor in layer.stacked_experts())
        gates = weights[name][:used].to(lora_B.dtype).view(-1, 1, 1)
        a = lora_A.flatten(0, 1)  # (n r, d_in): [A_1; ...; A_n]
        b = (lora_B * gates).transpose(0, 1).flatten(1)  # (d_out, n r): [w_1 B_1 ... w_n B_n]
        factors[name] = (a, b)
        scales.add(layer.router.expert_scale)
    (scale,) = scales  # every task router of a model has alpha / (n r)
    return factors, scale


def task_experts(model: MixLoraModel, task_id: int) -> int:
    """How many experts per layer task `task_id` uses: the run's own, and those each continuing run added when
    the task is not older than them."""
    config = model.mixlora_config
    return config.num_experts + sum(count for first, count in config.added_groups() if task_id >= first)


@torch.no_grad()
def export_peft(model: MixLoraModel, directory: str | Path, task_id: int) -> Path:
    """Write task `task_id`'s update of a `task`-router model as a peft LoRA adapter of rank n * r (n: the
    experts the task uses, `task_experts`).

    `peft.PeftModel.from_pretrained(base, directory)` then computes what `model` computes with that task id.
    """
    factors, scale = task_factors(model, task_id)
    rank = task_experts(model, task_id) * model.mixlora_config.expert_rank
    conv1d = any(isinstance(layer.base_layer, Conv1D) for layer in model.layers.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,  # peft's scaling lora_alpha / r == our scale
        target_modules=peft_target_modules(model.base_model, list(model.layers)),
        lora_dropout=model.mixlora_config.dropout,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name(model.base_model),
    )
    save_peft_adapter(directory, factors, config)
    write_card(directory, exported_card(base_model_name(model.base_model), task_id, rank))
    return Path(directory)


def exported_card(base_model: str | None, task_id: int, rank: int, task: str | None = None, scores=None) -> str:
    """The model card of one task of a MOELoRA model exported as a peft LoRA."""
    name, paper = PAPERS["task"]
    details = {"task id": str(task_id), "rank (experts x expert rank)": str(rank)}
    method = (f"{name}, one task exported as a peft LoRA", paper)
    tasks = [task] if task else None
    return model_card(base_model, method, details, library="peft", tasks=tasks, scores=scores)


def export_run(run_dir: str | Path, task: str, out_dir: str | Path) -> Path:
    """`loramix export --run runs/<name> --task <task> --out <dir>`: one task of a trained `task`-router run as a
    peft adapter (the task id is the task's index in the recipe's `tasks`)."""
    run = RunFolder(run_dir)
    recipe = load_recipe(run.recipe_file)
    if recipe.lora is not None:
        raise ValueError(
            f"{run.path} trained a plain peft LoRA (`lora:` recipe): {run.adapter_dir} already is a peft "
            f"adapter, shared by its tasks {recipe.tasks}"
        )
    _require_task_router(recipe.mixlora_config().router)
    if task not in recipe.tasks:
        raise ValueError(f"{run.path} was not trained on task {task!r}; its tasks are {recipe.tasks}")
    run.require_adapter()
    base, _ = load_model(recipe.model)
    task_id = recipe.tasks.index(task)
    exported = export_peft(run.load_adapter(base), out_dir, task_id)
    scores = run_card_scores(run.read_json("metrics.json"))
    rank = json.loads((exported / PEFT_CONFIG_NAME).read_text())["r"]
    card = exported_card(hub_id(recipe.model), task_id, rank, task, {task: scores[task]} if task in scores else None)
    write_card(exported, card)
    return exported
