"""Adding tasks to a finished `task`-router run without forgetting (recipe key `continue_from`).

A MOELoRA adapter routes by task id alone: task -> embedding row -> gate -> expert weights. A new task needs
only a new embedding row; the experts, the gate and every old task's row stay frozen, so each old task's
update, and so its outputs, stay bit-identical, while the new task learns which mix of the trained experts
serves it. With `continual.new_experts: m` the run also adds m LoRA experts per adapted layer and their gate,
used by the new tasks only (an old task's weights for them are exactly 0.0: `TaskRouter`, `MixLoraLinear`),
so that a new task can learn what the frozen experts cannot express. The continued run trains the new tasks
only (its sampler never draws an old one) and saves an ordinary task-router adapter with `num_tasks` = old +
new tasks: it loads, evaluates, merges, exports and serves like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def continued_mixlora(previous: PreviousRun, tasks: list[str], new_experts: int) -> dict:
    """The `mixlora:` section of a run continuing `previous` with `tasks`: the previous run's, with a task id
    for every task and the `new_experts` experts it adds for the new tasks."""
    section = previous.mixlora | {"num_tasks": len(tasks)}
    if not new_experts:
        return section
    if section.get("added_experts"):
        raise ValueError(
            f"recipe key continual.new_experts={new_experts} is invalid: {previous.folder.path} already added "
            f"{section['added_experts']} experts (for its tasks from id {section['added_from_task']}); experts are "
            "added once: continue it with new_experts: 0 (the new tasks may use every expert it has)"
        )
    return section | {"added_experts": new_experts, "added_from_task": len(previous.tasks)}


def continue_tasks(model: MixLoraModel, previous: PreviousRun) -> int:
    """Load the previous run's adapter into `model` (wrapped with more task ids, and the experts the run adds)
    and freeze it: the gradient of every old task's embedding row is zeroed, and only the task embeddings and
    the added experts are left to train (see `trained_parameters`). Returns the number of old tasks."""
    adapter = previous.folder.adapter_dir
    _, state = read_adapter(adapter)
    routers = task_routers(model)
    names = {f"{name}.embedding.weight" for name in routers}
    own = model.adapter_state_dict()
    old_tasks = next(iter(state[name] for name in names)).shape[0]
    adds_experts = model.mixlora_config.added_from_task == old_tasks
    merged = {}
    for name, tensor in own.items():
        if name in names:
            merged[name] = torch.cat([state[name], tensor[old_tasks:]])
        elif name in state:
            merged[name] = state[name]
        elif adds_experts and name.endswith(ADDED):
            merged[name] = tensor  # an expert (or its gate) that this run adds: freshly initialised
        else:
            raise ValueError(f"{adapter} lacks {name}: it is not the adapter this run continues")
    model.load_adapter_state_dict(merged, source=str(adapter))
    for router in routers.values():
        router.embedding.weight.register_hook(lambda grad: _without_rows(grad, old_tasks))
    return old_tasks


def trained_parameters(model: MixLoraModel, old_tasks: int) -> list[nn.Parameter]:
    """What a continuing run's optimizer updates: the task embeddings (their old rows get no gradient), and the
    experts and gate this run adds, if it adds any."""
    parameters = [router.embedding.weight for router in task_routers(model).values()]
    if model.mixlora_config.added_from_task == old_tasks:
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
