"""Multi-task training of a recipe into a run folder, resumable, on one process or several (torchrun)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

import loramix
from loramix.data import Example, collate, encode_example, get_task
from loramix.models import load_model
from loramix.recipe import Recipe, Training


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say)."""


# ---- data -----------------------------------------------------------------------------------------------------
class TaskSampler:
    """Draws training rows: a task by the sampling rule, then one of its examples, from a seeded generator."""

    def __init__(self, sizes: list[int], training: Training, seed: int) -> None:
        sizes_array = np.asarray(sizes, dtype=float)
        if training.sampling == "uniform":
            weights = np.ones_like(sizes_array)
        elif training.sampling == "proportional":
            weights = sizes_array
        else:
            weights = sizes_array ** (1.0 / training.sampling_temperature)
        self.probabilities = weights / weights.sum()
        self.sizes = sizes
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> list[tuple[int, int]]:
        """`count` (task index, example index) pairs."""
        tasks = self.rng.choice(len(self.sizes), size=count, p=self.probabilities)
        return [(int(t), int(self.rng.integers(self.sizes[t]))) for t in tasks]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class Encoder:
    """Encodes training examples on first use and counts the truncated ones."""

    def __init__(self, tokenizer, max_length: int, examples: list[list[Example]]) -> None:
        self.tokenizer, self.max_length, self.examples = tokenizer, max_length, examples
        self.cache: dict[tuple[int, int], dict] = {}
        self.truncated: dict[str, int] = {}

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = []
        for task, index in picks:
            if (task, index) not in self.cache:
                example = self.examples[task][index]
                row = encode_example(example, self.tokenizer, self.max_length)
                if row["truncated"]:
                    self.truncated[example.task] = self.truncated.get(example.task, 0) + 1
                self.cache[task, index] = row
            rows.append({**self.cache[task, index], "task_id": task})
        return collate(rows, self.tokenizer.pad_token_id)


# ---- model ----------------------------------------------------------------------------------------------------
def build_model(recipe: Recipe, device: torch.device) -> tuple[nn.Module, object]:
    """The base model with the recipe's adapter: a MixLoraModel, or a peft LoRA for `lora:` recipes."""
    base, tokenizer = load_model(recipe.model, device=device)
    if recipe.mixlora is not None:
        return loramix.wrap(base, recipe.mixlora_config()), tokenizer
    from peft import LoraConfig, get_peft_model

    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"} | recipe.lora
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings)), tokenizer


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the labelled tokens; for a MixLoraModel, its compute_loss (with auxiliary losses)."""
    if isinstance(model, loramix.MixLoraModel):
        return model.compute_loss(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: trainable parameters and the contrastive memory queues."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name in trainable or ".memory." in name
    }


def save_adapter(model: nn.Module, directory: Path) -> None:
    if isinstance(model, loramix.MixLoraModel):
        model.save_pretrained(directory)
    else:
        model.save_pretrained(str(directory), safe_serialization=True)


# ---- schedule -------------------------------------------------------------------------------------------------
def learning_rate_factor(step: int, training: Training) -> float:
    """Linear warm-up to 1, then the schedule's decay to 0 at the last step."""
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    if training.schedule == "constant":
        return 1.0
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    if training.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, model, optimizer, sampler: TaskSampler, step: int, encoder: Encoder) -> None:
    """Write model, optimizer, RNG and sampler state as safetensors + JSON, atomically (no pickle)."""
    tensors = {f"model.{name}": tensor for name, tensor in trainable_state(model).items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "sampler": sampler.state(),
        "python_rng": random.getstate(),
        "truncated": encoder.truncated,
    }
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    save_file(tensors, staging / "state.safetensors")
    (staging / "state.json").write_text(json.dumps(meta))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, model, optimizer, sampler: TaskSampler, encoder: Encoder) -> int:
    """Restore what save_checkpoint wrote; return the step to continue from."""
    tensors = load_file(directory / "state.safetensors")
    meta = json.loads((directory / "state.json").read_text())
    model_state = {name[6:]: t for name, t in tensors.items() if name.startswith("model.")}
    missing = set(trainable_state(model)) - set(model_state)
    if missing:
        raise ValueError(f"checkpoint {directory} does not fit this recipe's model: missing {sorted(missing)[:3]}")
    model.load_state_dict(model_state, strict=False)
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    sampler.restore(meta["sampler"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    encoder.truncated = meta["truncated"]
    return meta["step"]


# ---- distributed ----------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun / accelerate launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def average_gradients(parameters: list[nn.Parameter], world: int) -> None:
    """All-reduce the gradients of all ranks in one flat buffer (unused experts contribute zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
        offset += grad.numel()


# ---- the loop -------------------------------------------------------------------------------------------------
def _aux_parts(model: nn.Module) -> dict[str, float]:
    parts = getattr(model, "last_losses", {})
    return {k: float(v) for k, v in parts.items() if k != "ce"}


def _routing_summary(model: nn.Module) -> dict:
    if not isinstance(model, loramix.MixLoraModel):
        return {}
    stats = model.routing_stats()
    model.reset_routing_stats()
    ess = {name: s["ess"] for name, s in stats.items()}
    return {
        "ess": sum(ess.values()) / len(ess),
        "ess_per_layer": ess,
        "load_per_layer": {name: s["load"] for name, s in stats.items()},
    }


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, evaluate: bool = True) -> Path:
    """Train the recipe into `run_dir` (continuing its checkpoint if `resume`), then evaluate and report."""
    run_dir = Path(run_dir)
    settings = recipe.training
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank, world = init_distributed(device)
    checkpoint = run_dir / "checkpoint"
    if resume and not (checkpoint / "state.json").is_file():
        raise FileNotFoundError(f"nothing to resume: {checkpoint} holds no checkpoint")
    if not resume and checkpoint.exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another folder")

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model, tokenizer = build_model(recipe, device)
    model.train()
    tasks = [get_task(name) for name in recipe.tasks]
    train_sets = [task.load(recipe.data_dir)["train"] for task in tasks]
    encoder = Encoder(tokenizer, recipe.max_length, train_sets)
    sampler = TaskSampler([len(s) for s in train_sets], settings, seed=settings.seed + rank)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    if world > 1:  # the same start on every rank
        for parameter in parameters:
            dist.broadcast(parameter.data, 0)

    step = 0
    if resume:
        step = load_checkpoint(checkpoint, model, optimizer, sampler, encoder)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe.to_yaml(run_dir / "recipe.yaml")
        splits = {
            task.name: {"seed": 0, "sizes": {k: len(v) for k, v in task.load(recipe.data_dir).items()}}
            for task in tasks
        }
        (run_dir / "splits.json").write_text(json.dumps(splits, indent=2))
        (run_dir / "history.jsonl").write_text("")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    progress = tqdm(total=settings.steps, initial=step, desc=recipe.name, disable=rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    routing: dict = {}
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * learning_rate_factor(step, settings)
        total = 0.0
        for _ in range(settings.grad_accumulation):
            batch = {k: v.to(device) for k, v in encoder.batch(sampler.draw(settings.batch_size)).items()}
            with autocast:
                loss = answer_loss(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss is {float(loss)} at step {step + 1}: lower training.lr or check the data"
                )
            (loss / settings.grad_accumulation).backward()
            total += float(loss.detach()) / settings.grad_accumulation
        if world > 1:
            average_gradients(parameters, world)
        torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        aux = _aux_parts(model)
        progress.update(1)
        if rank == 0 and (step % settings.log_every == 0 or step == settings.steps):
            routing = _routing_summary(model)
            ce = float(model.last_losses["ce"]) if isinstance(model, loramix.MixLoraModel) else total
            record = {
                "step": step,
                "loss": total,
                "ce": ce,
                "aux": aux,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 2),
                **routing,
            }
            with (run_dir / "history.jsonl").open("a") as history:
                history.write(json.dumps(record) + "\n")
            shown = {"loss": f"{total:.3f}", "aux": f"{sum(aux.values()):.3f}"}
            if "ess" in routing:
                shown["ess"] = f"{routing['ess']:.2f}"
            progress.set_postfix(shown)
        if rank == 0 and (step % settings.save_every == 0 or step == settings.steps):
            save_checkpoint(checkpoint, model, optimizer, sampler, step, encoder)
    progress.close()

    if rank == 0:
        save_adapter(model, run_dir / "adapter")
        summary = {"steps": step, "truncated": encoder.truncated, "train_seconds": time.perf_counter() - started}
        (run_dir / "training.json").write_text(json.dumps(summary, indent=2))
        if routing:  # the routing of the last logged steps
            final = {
                name: {"load": routing["load_per_layer"][name], "ess": ess}
                for name, ess in routing["ess_per_layer"].items()
            }
            (run_dir / "routing.json").write_text(json.dumps(final))
        if evaluate:
            from loramix.evaluate import evaluate_run
            from loramix.report import write_report

            del model, optimizer
            evaluate_run(run_dir, data_dir=recipe.data_dir, max_examples=recipe.eval_examples)
            write_report(run_dir)
    if world > 1:
        dist.barrier()
    return run_dir
