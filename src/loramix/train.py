"""Multi-task training of a recipe into a run folder: resumable, on one process or several (torchrun)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

import loramix
from loramix.checkpoint import (
    check_resumable,
    load_checkpoint,
    rank_state,
    restore_rank_state,
    save_checkpoint,
    seed_everything,
    trim_history,
)
from loramix.compilation import compile_blocks
from loramix.continual import continue_tasks, trained_parameters
from loramix.data import Example, get_task
from loramix.data.sampling import Encoder, TaskSampler
from loramix.evaluate import evaluate_and_report
from loramix.learning_curve import LearningCurve
from loramix.methods import AdaptedModel
from loramix.model import read_adapter
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.process_group import RANK_LOCAL_BUFFERS, all_finite, device_name, gather, init_distributed, slowest
from loramix.recipe import Recipe, load_recipe
from loramix.run_folder import RunFolder, split_indices
from loramix.schedule import StepPlan, learning_rate_factor
from loramix.sharding import full, gradient_sync, shard
from loramix.tracking import Trackers, tracker_module


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say)."""


# ---- data -----------------------------------------------------------------------------------------------------
def held_out_batches(recipe: Recipe, tokenizer, dev_sets: dict[str, list[Example]], device: torch.device):
    """A function giving the dev examples as training batches (one task per batch, in a fixed order), for
    methods that score themselves on examples they do not train on; None without dev examples."""
    if not dev_sets:
        return None
    groups = [dev_sets.get(name, []) for name in recipe.tasks]
    encoder = Encoder(tokenizer, recipe.max_length, groups, recipe.system_prompt)
    size = recipe.training.batch_size
    picks = [
        [(task, i) for i in range(start, min(start + size, len(group)))]
        for task, group in enumerate(groups)
        for start in range(0, len(group), size)
    ]

    def batches() -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in encoder.batch(chunk).items()} for chunk in picks]

    return batches


# ---- model ----------------------------------------------------------------------------------------------------
def build_model(recipe: Recipe, device: torch.device) -> tuple[nn.Module, object]:
    """The base model with the recipe's adapter: a loramix AdaptedModel, or a peft LoRA for `lora:` recipes."""
    base, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
    if recipe.continue_from is not None:
        model = loramix.wrap(base, recipe.adapter_config())
        continue_tasks(model, recipe.previous_run())
        return model, tokenizer
    if recipe.lora is None:
        model = loramix.wrap(base, recipe.adapter_config())
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **recipe.lora))
    if recipe.init_from is not None:
        start_from(model, recipe)
    return model, tokenizer


def start_from(model: nn.Module, recipe: Recipe) -> None:
    """Load the adapter of the finished run `recipe.init_from` into `model`, built with the same settings."""
    run = RunFolder(recipe.init_from)
    where = f"recipe key init_from={recipe.init_from!r} is invalid"
    if not run.recipe_file.is_file() or not run.adapter_dir.is_dir():
        raise ValueError(f"{where}: expected a finished run folder (with recipe.yaml and adapter/)")
    previous = load_recipe(run.recipe_file)
    sections = ("model", "quantization", "lora", "mixlora", "method", "adapter")
    if differing := [key for key in sections if getattr(previous, key) != getattr(recipe, key)]:
        raise ValueError(f"{where}: that run's {', '.join(differing)} differ from this recipe's; start from a like run")
    if recipe.lora is not None:
        from peft.utils import set_peft_model_state_dict

        state = load_file(run.adapter_dir / "adapter_model.safetensors")
        if set_peft_model_state_dict(model, state).unexpected_keys:
            raise ValueError(f"{where}: {run.adapter_dir} does not fit this recipe's LoRA")
    else:
        model.load_adapter_state_dict(read_adapter(run.adapter_dir)[1], source=str(run.adapter_dir))


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels != -100); a loramix model's compute_loss adds its
    auxiliary losses (and the ReMix RLOO surrogate)."""
    if isinstance(model, AdaptedModel):
        return model.compute_loss(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


class LossModule(nn.Module):
    """The model with `answer_loss` as its forward, so that DistributedDataParallel sees the whole step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.model, batch)


def save_adapter(model: nn.Module, directory: Path, is_main_process: bool = True) -> None:
    """The run's adapter: loramix's save_pretrained, or peft's adapter files for `lora` recipes. Called on every
    rank (a sharded model gathers its tensors); the main process writes."""
    if isinstance(model, AdaptedModel):
        model.save_pretrained(directory, is_main_process=is_main_process)
    elif is_main_process:
        model.save_pretrained(str(directory), safe_serialization=True)


def routing_summary(model: nn.Module) -> dict:
    """ESS and expert load since the last call (for a MixLoraModel), then reset the statistics."""
    if not isinstance(model, loramix.MixLoraModel):
        return {}
    stats = model.routing_stats()
    model.reset_routing_stats()
    ess = {name: s["ess"] for name, s in stats.items()}
    return {
        "ess": sum(ess.values()) / max(len(ess), 1),
        "ess_per_layer": ess,
        "load_per_layer": {name: s["load"] for name, s in stats.items()},
        "probs_ess_per_layer": {name: s["probs_ess"] for name, s in stats.items() if "probs_ess" in s},
    }


class Tally:
    """Running means of the logged losses between two log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


# ---- the loop -------------------------------------------------------------------------------------------------
def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, evaluate: bool = True) -> Path:
    """Train `recipe` into `run_dir` (continuing its last checkpoint if `resume`); then, unless
    `evaluate=False`, score it on the test splits and write the report. Returns the run folder."""
    run = RunFolder(run_dir)
    rank, world, device = init_distributed()
    if resume:
        if not run.recipe_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {run.path} holds no run")
        check_resumable(recipe, run.path)
    elif run.recipe_file.exists():
        raise FileExistsError(f"{run.path} already holds a run: pass --resume to continue it, or choose another --run")
    for name in recipe.training.report_to:  # before the model loads
        tracker_module(name)
    if world > 1:  # every rank has checked the folder before rank 0 writes to it
        dist.barrier()
    _train_steps(recipe, run, resume, rank, world, device)
    if world > 1:
        dist.barrier()
    if evaluate and rank == 0:
        evaluate_and_report(run.path, recipe)
    return run.path


def _train_steps(recipe: Recipe, run: RunFolder, resume: bool, rank: int, world: int, device: torch.device) -> None:
    """The training loop: writes recipe.yaml, splits.json, history.jsonl, checkpoint/, adapter/,
    training.json, routing.json and, with `dev_examples`, learning_curve.jsonl (rank 0 only)."""
    settings = recipe.training
    seed_everything(settings.seed)  # the same initial adapter on every rank
    model, tokenizer = build_model(recipe, device)
    model.train()
    splits = split_indices(recipe.tasks, recipe.evaluation, recipe.data_dir, recipe.dev_examples)  # alike on every rank
    train_sets, dev_sets = _training_examples(recipe, splits)
    encoder = Encoder(tokenizer, recipe.max_length, train_sets, recipe.system_prompt)
    held_out = held_out_batches(recipe, tokenizer, dev_sets, device)
    continued = len(recipe.previous_run().tasks) if recipe.continue_from is not None else 0
    sizes = [0 if task < continued else len(s) for task, s in enumerate(train_sets)]  # added tasks train alone
    sampler = TaskSampler(sizes, recipe.sampling, recipe.sampling_temperature, settings.seed + rank, recipe.batching)
    sharded = settings.sharding == "fsdp" and world > 1
    if sharded:
        shard(model, device, world)
    if settings.compile:
        compile_blocks(model, "inductor" if settings.compile is True else settings.compile)
    trained = [p for p in model.parameters() if p.requires_grad]
    parameters = trained_parameters(model, continued) if continued else trained
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    plan = StepPlan(settings)
    scheduler = LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings, plan.steps))
    runner: nn.Module = LossModule(model)
    if world > 1 and not sharded:  # experts run densely: every adapter parameter gets a gradient on every rank
        runner = DistributedDataParallel(runner, **{RANK_LOCAL_BUFFERS: False})
    seed_everything(settings.seed + rank)  # other random draws (ReMix routes, dropout) differ by rank

    step, elapsed = 0, 0.0
    if resume:
        meta = load_checkpoint(run.checkpoint_dir, model, optimizer, scheduler)
        if meta["world_size"] != world:
            raise ValueError(f"{run.path} was trained on {meta['world_size']} processes: resume it on as many")
        step, elapsed = meta["step"], meta["seconds"]
        if plan.limit is not None and "plan" in meta:  # without a limit `training.steps` (maybe changed) rules
            plan.restore(meta["plan"])
        encoder.counts |= meta["counts"]  # checkpoints of earlier versions have no dropped_turns
        restore_rank_state(meta["ranks"][rank], sampler)
    if rank == 0:
        _prepare_folder(run, recipe, splits, bool(dev_sets), resume, step)
    bf16 = use_bf16(settings.bf16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    trackers = Trackers(settings.report_to, run.path, recipe, step) if rank == 0 and settings.report_to else None
    curve_path = run.path / "learning_curve.jsonl"
    curve = LearningCurve(curve_path, recipe, dev_sets, bf16, rank, world, trackers) if dev_sets else None
    progress = tqdm(total=plan.steps, initial=step, desc=recipe.name, disable=rank != 0, dynamic_ncols=True)
    tally, routing, started = Tally(), {}, time.perf_counter() - elapsed
    out_of_time = False
    if curve is not None and step == 0:  # the zero-shot point; its time is in the plan's
        plan.after_dev(curve.add(model, tokenizer, 0, time.perf_counter() - started))
    examples_per_step = settings.batch_size * settings.grad_accumulation * world

    def next_batch() -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in encoder.batch(sampler.draw(settings.batch_size)).items()}

    logged = (step, time.perf_counter() - started, plan.dev_seconds)  # for the examples per second
    while step < plan.steps and not out_of_time:
        accumulation = settings.grad_accumulation
        losses = _accumulated_step(runner, model, sharded, next_batch, accumulation, autocast, world, step)
        norm = full(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
        if not torch.isfinite(norm):
            raise TrainingError(f"the gradient norm is {float(norm)} at step {step + 1}: lower training.lr")
        optimizer.step()
        model.zero_grad(set_to_none=True)  # a continuing run's frozen adapter tensors have gradients too
        step += 1
        if isinstance(model, AdaptedModel):
            with autocast:
                model.after_optimizer_step(step, optimizer, held_out)
        if plan.limit is not None:  # planned before the next step's rate is set
            elapsed = slowest(time.perf_counter() - started, world)  # every rank decides alike
            plan.after_step(step, elapsed)
            progress.total = plan.steps
            out_of_time = plan.out_of_time(elapsed)
        rate = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        tally.add(losses)
        progress.update(1)
        last = step == plan.steps or out_of_time
        near_the_end = plan.steps - step < settings.dev_every // 2  # the last step's evaluation comes soon
        if curve is not None and (last or (step % settings.dev_every == 0 and not near_the_end)):
            plan.after_dev(curve.add(model, tokenizer, step, time.perf_counter() - started))
            if plan.limit is not None and not last:  # the evaluation may have spent the time left
                out_of_time = last = plan.out_of_time(slowest(time.perf_counter() - started, world))
        if step % settings.log_every == 0 or last:
            routing = routing_summary(model)
            now = time.perf_counter() - started
            examples = (step - logged[0]) * examples_per_step
            examples_per_second = examples / max(now - logged[1] - (plan.dev_seconds - logged[2]), 1e-9)
            logged = (step, now, plan.dev_seconds)
            record = _history_record(step, tally.means(), rate, now, examples_per_second, routing)
            if rank == 0:
                with (run.path / "history.jsonl").open("a") as history:
                    history.write(json.dumps(record) + "\n")
                if trackers is not None:
                    trackers.log(record, "train/")
            shown = {"loss": f"{record['loss']:.3f}", "aux": f"{record['loss'] - record['ce']:+.3f}"}
            progress.set_postfix(shown | ({"ess": f"{routing['ess']:.2f}"} if routing else {}))
        if step % settings.save_every == 0 or last:
            meta = {
                "step": step,
                "seconds": time.perf_counter() - started,
                "world_size": world,
                "counts": encoder.counts,
                "plan": plan.state(),
                "ranks": gather(rank_state(sampler), world),
            }
            save_checkpoint(run.checkpoint_dir, model, optimizer, scheduler, meta, is_main_process=rank == 0)
    progress.close()
    if trackers is not None:
        trackers.close()

    save_adapter(model, run.adapter_dir, is_main_process=rank == 0)
    if rank == 0:
        summary = {
            "steps": step,
            "seconds": round(time.perf_counter() - started, 1),
            "time_limit_seconds": plan.limit,
            "stopped_by_time_limit": out_of_time and step < plan.steps,
            "world_size": world,
            "device": device_name(device),
            "max_length": recipe.max_length,
            "bf16": bf16,
            **encoder.counts,
        }
        _write_summary(run, summary, routing)


def _training_examples(recipe: Recipe, splits: dict) -> tuple[list[list[Example]], dict[str, list[Example]]]:
    """(each trained task's training examples, in the recipe's order; its dev examples, by task, where it has
    some) by the indices of splits.json."""
    loaded = {name: get_task(name).load(recipe.data_dir)["train"] for name in recipe.tasks}
    train_sets = [[loaded[name][i] for i in splits[name]["indices"]["train"]] for name in recipe.tasks]
    dev_sets = {
        name: [loaded[name][i] for i in splits[name]["indices"]["dev"]]
        for name in recipe.tasks
        if "dev" in splits[name]["indices"]
    }
    return train_sets, dev_sets


def _prepare_folder(run: RunFolder, recipe: Recipe, splits: dict, curve: bool, resume: bool, step: int) -> None:
    """Rank 0's part of the start: a new run's folder and files, or a resumed run's records cut back to its
    checkpoint (`step`); recipe.yaml either way (a resumed run may have changed the step count)."""
    if resume:
        trim_history(run.path / "history.jsonl", step)
        trim_history(run.path / "learning_curve.jsonl", step)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "splits.json").write_text(json.dumps(splits))
        (run.path / "history.jsonl").write_text("")
        if curve:
            (run.path / "learning_curve.jsonl").write_text("")
    recipe.to_yaml(run.recipe_file)


def _accumulated_step(
    runner: nn.Module, model: nn.Module, sharded: bool, next_batch, accumulation: int, autocast, world: int, step: int
) -> dict[str, float]:
    """The gradients of one optimizer step, accumulated over `accumulation` batches of `next_batch()` (synchronised
    between the ranks on the last one), and the mean of each logged loss; TrainingError on a non-finite loss."""
    losses: dict[str, float] = {}
    for micro in range(accumulation):
        batch = next_batch()
        with gradient_sync(model if sharded else runner, micro == accumulation - 1):
            with autocast:
                loss = runner(batch)
            if not all_finite(loss, world):
                raise TrainingError(
                    f"the loss is {float(loss.detach())} at step {step + 1}: lower training.lr or check the data"
                )
            (loss / accumulation).backward()
        parts = {"loss": loss.detach(), **getattr(model, "last_losses", {})}
        for key, value in parts.items():
            losses[key] = losses.get(key, 0.0) + float(value) / accumulation
    return losses


def _history_record(
    step: int, means: dict[str, float], rate: float, seconds: float, examples_per_second: float, routing: dict
) -> dict:
    """history.jsonl's line of a logged step: the mean losses since the last one, the rate, the time, the speed
    and the routing statistics."""
    return {
        "step": step,
        "loss": means["loss"],
        "ce": means.get("ce", means["loss"]),
        "aux": {k: v for k, v in means.items() if k not in ("loss", "ce")},
        "lr": rate,
        "seconds": round(seconds, 2),
        "examples_per_second": round(examples_per_second, 2),
        **routing,
    }


def _write_summary(run: RunFolder, summary: dict, routing: dict) -> None:
    """training.json, and routing.json (the routing of the last logged steps, for the report's expert-load plot)."""
    (run.path / "training.json").write_text(json.dumps(summary, indent=2))
    if routing:
        loads = routing["load_per_layer"]
        final = {name: {"load": loads[name], "ess": ess} for name, ess in routing["ess_per_layer"].items()}
        (run.path / "routing.json").write_text(json.dumps(final))
