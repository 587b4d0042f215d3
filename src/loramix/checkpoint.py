"""Resuming a run: its checkpoint (the trained tensors, the optimizer and the scheduler, saved atomically in
safetensors and JSON, no pickle), every process's random state, and the recipe changes a resumed run allows."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from loramix.data.sampling import TaskSampler
from loramix.losses import ExpertMemoryQueue
from loramix.methods import AdaptedModel
from loramix.recipe import Recipe, Training
from loramix.sharding import full, is_sharded, like

# Keys a resumed run may change: they do not alter what the finished steps computed.
RESUMABLE_CHANGES = {
    "training.compile",
    "training.report_to",
    "training.steps",
    "training.log_every",
    "training.save_every",
    "eval_examples",
    "eval_mode",
    "evaluation",
}


# ---- checkpoints ----------------------------------------------------------------------------------------------
def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes in the model: trainable parameters and the contrastive memory queues, as
    they are held (a sharded model's parameters as this rank's DTensor shards)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    queues = {
        f"{prefix}.{name}"
        for prefix, m in model.named_modules()
        if isinstance(m, ExpertMemoryQueue)
        for name, _ in m.named_buffers()
    }
    kept = trainable | queues | (set(model.adapter_buffers()) if isinstance(model, AdaptedModel) else set())
    return {name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items() if name in kept}


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, meta: dict, is_main_process=True) -> None:
    """Write the training state atomically (a temporary folder, then os.replace): tensors in
    safetensors, everything else in JSON, no pickle. `meta` holds the step and the ranks' random states.
    Called on every rank: a sharded model's tensors are gathered whole; the main process writes them."""
    if not is_main_process and not is_sharded(model):  # only a sharded model needs every rank to gather
        return
    tensors = {f"model.{name}": full(tensor).cpu().contiguous() for name, tensor in training_state(model).items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = full(torch.as_tensor(value)).detach().cpu().contiguous()
    if not is_main_process:
        return
    meta = meta | {"param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict()}
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save_file(tensors, staging / "state.safetensors")
        (staging / "state.json").write_text(json.dumps(meta))
        previous = directory.with_name(f".{directory.name}.previous")
        if directory.exists():
            os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model and optimizer tensors and the scheduler from save_checkpoint's files; return its meta."""
    if not (directory / "state.json").is_file():
        previous = directory.with_name(f".{directory.name}.previous")
        if (previous / "state.json").is_file():  # killed between the two renames of save_checkpoint
            directory = previous
        else:
            raise FileNotFoundError(f"nothing to resume: {directory} holds no checkpoint")
    tensors = load_file(directory / "state.safetensors")
    meta = json.loads((directory / "state.json").read_text())
    model_state = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    expected = training_state(model)
    wrong = sorted(set(expected) ^ set(model_state)) + [
        name for name in expected if name in model_state and model_state[name].shape != expected[name].shape
    ]
    if wrong:
        raise ValueError(f"the checkpoint in {directory} does not fit this recipe's model: {wrong[:3]}")
    model.load_state_dict({name: like(tensor, expected[name]) for name, tensor in model_state.items()}, strict=False)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            parameter = parameters[int(index)]  # moments are laid out as their parameter, the step count is not
            state.setdefault(int(index), {})[key] = (
                like(tensor, parameter) if tensor.shape == parameter.shape else tensor
            )
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta


# ---- random state ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rank_state(sampler: TaskSampler) -> dict:
    """This process's random state: the sampler's, Python's, NumPy's and torch's (CPU and CUDA)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "sampler": sampler.state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rank_state(state: dict, sampler: TaskSampler) -> None:
    sampler.restore(state["sampler"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---- what may change --------------------------------------------------------------------------------------------
def check_resumable(recipe: Recipe, run_dir: Path) -> None:
    """A resumed run must use the recipe it started with, but for the keys of RESUMABLE_CHANGES (a key newer
    than the run's recipe.yaml counts as its default there)."""

    saved, given = _flatten(yaml.safe_load((run_dir / "recipe.yaml").read_text())), _flatten(recipe.to_dict())
    defaults = _flatten({f.name: f.default for f in fields(Recipe) if f.default is not MISSING})
    defaults |= {f.name: f.default_factory() for f in fields(Recipe) if f.default_factory is list}
    defaults |= _flatten({"training": asdict(Training())})
    changed = sorted(k for k in saved.keys() | given.keys() if saved.get(k, defaults.get(k)) != given.get(k))
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(
            f"cannot resume {run_dir} with a different recipe: {changed} changed; "
            f"only {sorted(RESUMABLE_CHANGES)} may change"
        )


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("training", "mixlora", "lora", "adapter"):
            flat |= _flatten(value, f"{key}.")
        else:
            flat[prefix + key] = value
    return flat


def trim_history(path: Path, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
