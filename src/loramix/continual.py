"""Adding tasks to a finished `task`-router run without forgetting (recipe key `continue_from`).

A MOELoRA adapter routes by task id alone: task -> embedding row -> gate -> expert weights. A new task needs
only a new embedding row; the experts, the gate and every old task's row stay frozen, so each old task's
update, and so its outputs, stay bit-identical, while the new task learns which mix of the trained experts
serves it. With `continual.new_experts: m` the run also adds m LoRA experts per adapted layer and their gate,
used by the new tasks only (an old task's weights for them are exactly 0.0: `TaskRouter`, `MixLoraLinear`),
so that a new task can learn what the frozen experts cannot express; a later continuation may add experts
again for its own tasks (the earlier additions then stay frozen too). By default the new tasks then route over
their new experts alone, as a fresh run of that many experts would, and training skips the frozen experts'
products; with `continual.reuse_experts: true` they route over every expert. The continued run trains the new tasks
only (its sampler never draws an old one) and saves an ordinary task-router adapter with `num_tasks` = old +
new tasks: it loads, evaluates, merges, exports and serves like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loramix.config import MixLoraConfig
from loramix.model import MixLoraModel, read_adapter
from loramix.routing.task import TaskRouter
from loramix.run_folder import RunFolder

ADDED = ("added_A", "added_B", "added_gate.weight")  # the names of the tensors that `continual.new_experts` adds


@dataclass
class PreviousRun:
    """The finished `task`-router run that a recipe continues (`continue_from`), read once: its folder, its tasks
    (whose ids the continuing run keeps) and its `mixlora:` section."""

    folder: RunFolder
    tasks: list[str]
    mixlora: dict


def read_previous_run(continue_from: str, tasks: list[str], model: str, quantization: str | None) -> PreviousRun:
    """The run a recipe with these `tasks`, base `model` and `quantization` continues, checked: a finished
    `task`-router run of the same base model whose tasks begin `tasks`, followed by at least one new task."""
    folder = RunFolder(continue_from)
    if not folder.recipe_file.is_file() or not folder.adapter_dir.is_dir():
        raise ValueError(
            f"recipe key continue_from={continue_from!r} is invalid: expected a finished run folder "
            "(with recipe.yaml and adapter/) of a `task`-router run"
        )
    previous = folder.saved_recipe()
    if previous.mixlora is None or previous.mixlora.get("router") != "task":
        raise ValueError(
            f"recipe key continue_from={continue_from!r} is invalid: that run trained "
            f"{previous.method}, but tasks can be added to a `task`-router (MOELoRA) run only"
        )
    old, new = previous.tasks, tasks[len(previous.tasks) :]
    if tasks[: len(old)] != old or not new:
        raise ValueError(
            f"recipe key tasks={tasks} is invalid: a run continuing {folder.path} lists its tasks {old} first, in "
            "that order (their task ids), then at least one new task"
        )
    if model != previous.model or quantization != previous.quantization:
        raise ValueError(
            f"recipe key model={model!r} is invalid: {folder.path} trained on {previous.model!r}"
            f"{f' ({previous.quantization})' if previous.quantization else ''}; continue it on the same base"
        )
    return PreviousRun(folder, old, previous.mixlora)


def continued_mixlora(previous: PreviousRun, tasks: list[str], new_experts: int, reuse_experts: bool = False) -> dict:
    """The `mixlora:` section of a run continuing `previous` with `tasks`: the previous run's, with a task id
    for every task and the `new_experts` experts it adds for the new tasks (after those earlier continuations
    added), which they use alone unless `reuse_experts`."""
    section = previous.mixlora | {"num_tasks": len(tasks)}
    if not new_experts:
        return section
    config = MixLoraConfig.from_dict(previous.mixlora)
    groups = [*config.added_groups(), (len(previous.tasks), new_experts)]
    exclusive = [*config.exclusive_additions(), not reuse_experts]
    if len(groups) == 1:
        added = {"added_experts": new_experts, "added_from_task": len(previous.tasks)}
        return section | added | ({"added_exclusive": True} if not reuse_experts else {})
    return section | {
        "added_experts": [m for _, m in groups],
        "added_from_task": [first for first, _ in groups],
        "added_exclusive": exclusive,
    }


def continue_tasks(model: MixLoraModel, previous: PreviousRun) -> int:
    """Load the previous run's adapter into `model` (wrapped with more task ids, and the experts the run adds)
    and freeze it: the gradient of every old task's embedding row, and of the experts earlier continuations
    added, is zeroed, and only the task embeddings and the added experts are left to train (see
    `trained_parameters`). Returns the number of old tasks."""
    adapter = previous.folder.adapter_dir
    _, state = read_adapter(adapter)
    routers = task_routers(model)
    names = {f"{name}.embedding.weight" for name in routers}
    own = model.adapter_state_dict()
    old_tasks = next(iter(state[name] for name in names)).shape[0]
    groups = model.mixlora_config.added_groups()
    adds_experts = adds_experts_for(model, old_tasks)
    kept = sum(count for _, count in groups[:-1]) if adds_experts else 0  # experts that earlier runs added
    merged = {}
    for name, tensor in own.items():
        if name in names:
            merged[name] = torch.cat([state[name], tensor[old_tasks:]])
        elif adds_experts and name.endswith(ADDED) and state.get(name, tensor[:0]).shape[0] == kept:
            merged[name] = torch.cat([state[name], tensor[kept:]]) if kept else tensor  # this run's: fresh
        elif name in state:
            merged[name] = state[name]
        else:
            raise ValueError(f"{adapter} lacks {name}: it is not the adapter this run continues")
    model.load_adapter_state_dict(merged, source=str(adapter))
    for router in routers.values():
        router.embedding.weight.register_hook(lambda grad: _without_rows(grad, old_tasks))
    if kept:
        for parameter in trained_parameters(model, old_tasks)[len(routers) :]:
            parameter.register_hook(lambda grad: _without_rows(grad, kept))
    if adds_experts and model.mixlora_config.exclusive_additions()[-1]:
        for layer in model.layers.values():  # the run trains only its new tasks, which weigh the rest 0.0
            layer.trains_last_addition_only = True
    return old_tasks


def adds_experts_for(model: MixLoraModel, old_tasks: int) -> bool:
    """Whether the run continuing `old_tasks` tasks adds experts of its own (its last addition starts there)."""
    groups = model.mixlora_config.added_groups()
    return bool(groups) and groups[-1][0] == old_tasks


def trained_parameters(model: MixLoraModel, old_tasks: int) -> list[nn.Parameter]:
    """What a continuing run's optimizer updates: the task embeddings (their old rows get no gradient), and the
    experts and gate this run adds, if it adds any (stored after those of earlier continuations, whose rows
    `continue_tasks` keeps from training)."""
    parameters = [router.embedding.weight for router in task_routers(model).values()]
    if adds_experts_for(model, old_tasks):
        parameters += [parameter for name, parameter in model.named_parameters() if name.endswith(ADDED)]
    return parameters


def task_routers(model: MixLoraModel) -> dict[str, TaskRouter]:
    """The model's task routers by their parameter prefix in the adapter's state dict."""
    prefix = "base_model."
    return {
        name.removeprefix(prefix): module for name, module in model.named_modules() if isinstance(module, TaskRouter)
    }


def _without_rows(grad: torch.Tensor, rows: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:rows] = 0
    return grad
