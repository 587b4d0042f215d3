"""Multi-task training of a recipe into a run folder: resumable, on one process or several (torchrun)."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

import loramix
from loramix.compilation import compile_blocks
from loramix.continual import continue_tasks, previous_run, trained_parameters
from loramix.data import SPLIT_SEED, Example, collate, encode_example, get_task
from loramix.evaluate import evaluate_model
from loramix.losses import ExpertMemoryQueue
from loramix.methods import AdaptedModel
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import Recipe, Training, parse_duration
from loramix.sharding import full, gradient_sync, is_sharded, like, shard
from loramix.tracking import Trackers, tracker_module

CALIBRATION_STEPS = 10  # steps timed to plan a run with a time limit
DEV_MAX_NEW_TOKENS = 32  # the most tokens a dev answer of a free-text task is given (the curve stays cheap)
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


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say)."""


# ---- data -----------------------------------------------------------------------------------------------------
class TaskSampler:
    """Draws training rows from a seeded generator: a task by the sampling rule, then one of its examples; with
    `batching="task"` one task per batch, so that short tasks' rows are not padded to long tasks' length."""

    def __init__(self, sizes: list[int], sampling: str, temperature: float, seed: int, batching: str = "mixed") -> None:
        counts = np.asarray(sizes, dtype=float)
        if sampling == "uniform":
            weights = np.ones_like(counts)
        elif sampling == "proportional":
            weights = counts
        elif sampling == "temperature":
            weights = counts ** (1.0 / temperature)
        else:
            raise ValueError(f"sampling={sampling!r}; allowed: proportional, temperature, uniform")
        if batching not in ("mixed", "task"):
            raise ValueError(f"batching={batching!r}; allowed: mixed, task")
        weights = np.where(counts > 0, weights, 0.0)  # a task without examples is never drawn
        self.probabilities = weights / weights.sum()
        self.sizes, self.batching = sizes, batching
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> list[tuple[int, int]]:
        """`count` (task index, example index) pairs."""
        if self.batching == "task":
            tasks = [self.rng.choice(len(self.sizes), p=self.probabilities)] * count
        else:
            tasks = self.rng.choice(len(self.sizes), size=count, p=self.probabilities)
        return [(int(t), int(self.rng.integers(self.sizes[t]))) for t in tasks]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class Encoder:
    """Encodes training examples on first use (answer-only labels, context-side truncation) and counts,
    per task, the distinct examples drawn ("encoded"), how many of them lost context ("truncated") and the
    earliest conversation turns dropped to fit ("dropped_turns")."""

    def __init__(
        self, tokenizer, max_length: int, examples: list[list[Example]], system_prompt: str | None = None
    ) -> None:
        self.tokenizer, self.max_length, self.examples = tokenizer, max_length, examples
        self.system_prompt = system_prompt
        self.cache: dict[tuple[int, int], dict] = {}
        names = [group[0].task if group else "" for group in examples]
        self.counts = {key: dict.fromkeys(names, 0) for key in ("encoded", "truncated", "dropped_turns")}

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = []
        for task, index in picks:
            if (task, index) not in self.cache:
                example = self.examples[task][index]
                row = encode_example(example, self.tokenizer, self.max_length, system_prompt=self.system_prompt)
                self.counts["encoded"][example.task] += 1
                self.counts["truncated"][example.task] += int(row["truncated"])
                self.counts["dropped_turns"][example.task] += row["dropped_turns"]
                self.cache[task, index] = row
            rows.append({**self.cache[task, index], "task_id": task})
        return collate(rows, self.tokenizer.pad_token_id)


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


def split_indices(recipe: Recipe) -> dict[str, dict]:
    """splits.json: per task, the split sizes and the indices used; the test indices are a seeded
    permutation, so that evaluating the first `eval_examples` scores a random, reproducible subset. With
    `dev_examples`, a trained task's "dev" indices (the last ones of a seeded permutation of its train split,
    for the learning curve) are left out of its "train" indices, which are all that training draws."""
    splits = {}
    for name in dict.fromkeys([*recipe.tasks, *recipe.evaluation]):
        loaded = get_task(name).load(recipe.data_dir)
        test = np.random.default_rng(SPLIT_SEED).permutation(len(loaded.get("test", []))).tolist()
        size, held_out = len(loaded.get("train", [])), recipe.dev_examples if name in recipe.tasks else 0
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


# ---- model ----------------------------------------------------------------------------------------------------
def build_model(recipe: Recipe, device: torch.device) -> tuple[nn.Module, object]:
    """The base model with the recipe's adapter: a loramix AdaptedModel, or a peft LoRA for `lora:` recipes."""
    base, tokenizer = load_model(recipe.model, device=device, quantization=recipe.quantization)
    if recipe.continue_from is not None:
        model = loramix.wrap(base, recipe.adapter_config())
        continue_tasks(model, previous_run(recipe)[0])
        return model, tokenizer
    if recipe.lora is None:
        return loramix.wrap(base, recipe.adapter_config()), tokenizer
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **recipe.lora)), tokenizer


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


def save_adapter(model: nn.Module, directory: Path, is_main_process: bool = True) -> None:
    """The run's adapter: loramix's save_pretrained, or peft's adapter files for `lora` recipes. Called on every
    rank (a sharded model gathers its tensors); the main process writes."""
    if isinstance(model, AdaptedModel):
        model.save_pretrained(directory, is_main_process=is_main_process)
    elif is_main_process:
        model.save_pretrained(str(directory), safe_serialization=True)


# ---- schedule -------------------------------------------------------------------------------------------------
def learning_rate_factor(step: int, training: Training, total_steps: int | None = None) -> float:
    """The factor of the peak learning rate at `step` (0-based): linear warm-up to 1 over `warmup_steps`,
    then the schedule's decay (cosine, linear or none) to 0 at the last of `total_steps` (default: `steps`)."""
    total = total_steps or training.steps
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    if training.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - training.warmup_steps) / max(1, total - training.warmup_steps))
    if training.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepPlan:
    """How many steps a run takes: `training.steps`, or with a `time_limit` as many as fit (at most `steps`),
    planned once from the speed of the CALIBRATION_STEPS steps after the first (which also pays for warming
    up) and, for a learning curve, the mean time of its dev evaluations (one every `dev_every` steps, one more
    after the last step). The limit is the training's: the evaluation on the test splits comes after it. The
    run also stops, whatever was planned, once its time is up."""

    def __init__(self, training: Training) -> None:
        self.limit = parse_duration(training.time_limit) if training.time_limit else None
        self.steps, self.dev_every = training.steps, training.dev_every
        self.planned = self.limit is None
        self.timer: tuple[int, float] | None = None  # (step, seconds not spent on dev) when the calibration began
        self.dev_seconds, self.dev_count = 0.0, 0  # the dev evaluations so far

    def after_dev(self, seconds: float) -> None:
        """Called after each dev evaluation with the seconds it took (already in the next `elapsed`)."""
        self.dev_seconds += seconds
        self.dev_count += 1

    def after_step(self, step: int, elapsed: float) -> None:
        """Called after each step with the seconds spent so far; plans the step count once calibrated."""
        if self.planned:
            return
        if self.timer is None:
            self.timer = (step, elapsed - self.dev_seconds)
        elif step - self.timer[0] >= CALIBRATION_STEPS:
            per_step = (elapsed - self.dev_seconds - self.timer[1]) / (step - self.timer[0])
            left = self.limit - elapsed
            if self.dev_count:
                per_dev = self.dev_seconds / self.dev_count
                per_step += per_dev / self.dev_every
                left -= per_dev  # the evaluation after the last step
            fitting = step + int(left / per_step)
            self.steps, self.planned = max(step, min(self.steps, fitting)), True

    def out_of_time(self, elapsed: float) -> bool:
        return self.limit is not None and elapsed >= self.limit

    def state(self) -> dict:
        return {"steps": self.steps, "planned": self.planned, "dev": [self.dev_seconds, self.dev_count]}

    def restore(self, state: dict) -> None:
        self.steps, self.planned = state["steps"], state["planned"]
        # checkpoints of earlier versions have neither
        self.dev_seconds, self.dev_count = state.get("dev", (0.0, 0))


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


# ---- checkpoints ----------------------------------------------------------------------------------------------
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


# ---- distributed ----------------------------------------------------------------------------------------------
# Buffers (routing statistics, contrastive memory queues) stay local to each rank after the start;
# torch 2.13 renamed DDP's option.
RANK_LOCAL_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun / accelerate launch
    (gloo on CPU, nccl on CUDA), once per process: the caller owns it (the CLI destroys it at the end)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def device_name(device: torch.device) -> str:
    """What trained a run, for its training.json: the GPU's name (for example "NVIDIA H200"), else the CPU threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def all_finite(value: torch.Tensor, world: int) -> bool:
    """Whether the value is finite on every rank (so that all ranks stop together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def slowest(seconds: float, world: int) -> float:
    """The largest of the ranks' values (seconds spent), on every rank."""
    if world == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def gather(value: object, world: int) -> list:
    """A picklable value from every rank, on every rank (in memory; nothing is pickled to disk)."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


# ---- the run folder -------------------------------------------------------------------------------------------
def check_resumable(recipe: Recipe, run_dir: Path) -> None:
    """A resumed run must use the recipe it started with, but for the keys of RESUMABLE_CHANGES (a key newer
    than the run's recipe.yaml counts as its default there)."""
    import yaml

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


@contextlib.contextmanager
def routing_stats_kept(model: nn.Module):
    """The routers' statistics (their `stat_*` buffers) as they were before the block, whatever it ran."""
    routers = {id(r): r for r in model.routers().values()} if isinstance(model, loramix.MixLoraModel) else {}
    saved = [
        (buffer, buffer.clone())
        for router in routers.values()
        for name, buffer in router.named_buffers(recurse=False)
        if name.startswith("stat_")
    ]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


class LearningCurve:
    """learning_curve.jsonl: each trained task's metrics on its dev examples at some steps of a run. Rank 0
    scores them; the other ranks wait for it, or, for a sharded model (whose every forward is a collective),
    score the same examples alongside it."""

    def __init__(
        self,
        path: Path,
        recipe: Recipe,
        dev_sets: dict[str, list[Example]],
        bf16: bool,
        rank: int,
        world: int,
        trackers: Trackers | None = None,
    ) -> None:
        self.path, self.recipe, self.dev_sets, self.bf16 = path, recipe, dev_sets, bf16
        self.rank, self.world, self.trackers = rank, world, trackers

    def scores(self, model: nn.Module, tokenizer) -> dict[str, dict[str, float]]:
        """Per task, the metrics of its dev examples by `evaluate_model` in the recipe's eval_mode (free-text
        answers of at most DEV_MAX_NEW_TOKENS tokens); the routers' statistics stay those of training."""
        adapted = isinstance(model, AdaptedModel)
        scores = {}
        with routing_stats_kept(model):
            for name, examples in self.dev_sets.items():
                result = evaluate_model(
                    model,
                    tokenizer,
                    {name: examples},
                    task_ids={name: self.recipe.tasks.index(name)} if adapted else None,
                    mode=self.recipe.eval_mode,
                    batch_size=16,
                    max_prompt_length=self.recipe.max_length,
                    max_new_tokens=min(get_task(name).max_new_tokens, DEV_MAX_NEW_TOKENS),
                    bf16=self.bf16,
                    system_prompt=self.recipe.system_prompt,
                    perplexity=False,
                )
                scores[name] = result[name]["metrics"]
        return scores

    def add(self, model: nn.Module, tokenizer, step: int, seconds: float) -> float:
        """Score the dev examples after `step` steps, `seconds` into the run, and append their line; returns
        the seconds that took (on every rank: they wait in `slowest` for rank 0)."""
        started = time.perf_counter()
        if self.rank != 0 and is_sharded(model):
            self.scores(model, tokenizer)
        elif self.rank == 0:
            tasks = self.scores(model, tokenizer)
            line = {"step": step, "seconds": round(seconds, 2), "dev_seconds": round(time.perf_counter() - started, 2)}
            with self.path.open("a") as curve:
                curve.write(json.dumps(line | {"tasks": tasks}) + "\n")
            if self.trackers is not None:  # the load since the last logged step, as history.jsonl will show it
                self.trackers.log(line | {"tasks": tasks}, "dev/")
                routing = model.routing_stats() if isinstance(model, loramix.MixLoraModel) else {}
                self.trackers.expert_load(routing, step)
        return slowest(time.perf_counter() - started, self.world)


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


def evaluate_and_report(run_dir: Path, recipe: Recipe, max_examples: int | None = None, **options) -> dict:
    """Score the run (metrics.json) and write its report; evaluation-by-generation is evaluate.py's."""
    from loramix.evaluate import evaluate_run
    from loramix.report import write_report

    limit = recipe.eval_examples if max_examples is None else max_examples
    metrics = evaluate_run(run_dir, data_dir=recipe.data_dir, max_examples=limit, **options)
    write_report(run_dir)
    return metrics


# ---- the loop -------------------------------------------------------------------------------------------------
def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, evaluate: bool = True) -> Path:
    """Train `recipe` into `run_dir` (continuing its last checkpoint if `resume`); then, unless
    `evaluate=False`, score it on the test splits and write the report. Returns the run folder."""
    run_dir = Path(run_dir)
    rank, world, device = init_distributed()
    if resume:
        if not (run_dir / "recipe.yaml").is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir} holds no run")
        check_resumable(recipe, run_dir)
    elif (run_dir / "recipe.yaml").exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --run")
    for name in recipe.training.report_to:  # before the model loads
        tracker_module(name)
    if world > 1:  # every rank has checked the folder before rank 0 writes to it
        dist.barrier()
    _train_steps(recipe, run_dir, resume, rank, world, device)
    if world > 1:
        dist.barrier()
    if evaluate and rank == 0:
        evaluate_and_report(run_dir, recipe)
    return run_dir


def _train_steps(recipe: Recipe, run_dir: Path, resume: bool, rank: int, world: int, device: torch.device) -> None:
    """The training loop: writes recipe.yaml, splits.json, history.jsonl, checkpoint/, adapter/,
    training.json, routing.json and, with `dev_examples`, learning_curve.jsonl (rank 0 only)."""
    settings = recipe.training
    seed_everything(settings.seed)  # the same initial adapter on every rank
    model, tokenizer = build_model(recipe, device)
    model.train()
    splits = split_indices(recipe)  # on every rank: the same indices
    loaded = {name: get_task(name).load(recipe.data_dir)["train"] for name in recipe.tasks}
    train_sets = [[loaded[name][i] for i in splits[name]["indices"]["train"]] for name in recipe.tasks]
    dev_sets = {
        name: [loaded[name][i] for i in splits[name]["indices"]["dev"]]
        for name in recipe.tasks
        if "dev" in splits[name]["indices"]
    }
    encoder = Encoder(tokenizer, recipe.max_length, train_sets, recipe.system_prompt)
    held_out = held_out_batches(recipe, tokenizer, dev_sets, device)
    continued = len(previous_run(recipe)[1].tasks) if recipe.continue_from is not None else 0
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
        meta = load_checkpoint(run_dir / "checkpoint", model, optimizer, scheduler)
        if meta["world_size"] != world:
            raise ValueError(f"{run_dir} was trained on {meta['world_size']} processes: resume it on as many")
        step, elapsed = meta["step"], meta["seconds"]
        if plan.limit is not None and "plan" in meta:  # without a limit `training.steps` (maybe changed) rules
            plan.restore(meta["plan"])
        encoder.counts |= meta["counts"]  # checkpoints of earlier versions have no dropped_turns
        restore_rank_state(meta["ranks"][rank], sampler)
        if rank == 0:
            trim_history(run_dir / "history.jsonl", step)
            trim_history(run_dir / "learning_curve.jsonl", step)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "splits.json").write_text(json.dumps(splits))
        (run_dir / "history.jsonl").write_text("")
        if dev_sets:
            (run_dir / "learning_curve.jsonl").write_text("")
    if rank == 0:
        recipe.to_yaml(run_dir / "recipe.yaml")  # a resumed run may have changed the step count
    bf16 = use_bf16(settings.bf16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    trackers = Trackers(settings.report_to, run_dir, recipe, step) if rank == 0 and settings.report_to else None
    curve_path = run_dir / "learning_curve.jsonl"
    curve = LearningCurve(curve_path, recipe, dev_sets, bf16, rank, world, trackers) if dev_sets else None
    progress = tqdm(total=plan.steps, initial=step, desc=recipe.name, disable=rank != 0, dynamic_ncols=True)
    tally, routing, started = Tally(), {}, time.perf_counter() - elapsed
    out_of_time = False
    if curve is not None and step == 0:  # the zero-shot point; its time is in the plan's
        plan.after_dev(curve.add(model, tokenizer, 0, time.perf_counter() - started))
    examples_per_step = settings.batch_size * settings.grad_accumulation * world
    logged = (step, time.perf_counter() - started, plan.dev_seconds)  # for the examples per second
    while step < plan.steps and not out_of_time:
        losses: dict[str, float] = {}
        for micro in range(settings.grad_accumulation):
            final_micro_step = micro == settings.grad_accumulation - 1
            sync = gradient_sync(model if sharded else runner, final_micro_step)
            batch = {k: v.to(device) for k, v in encoder.batch(sampler.draw(settings.batch_size)).items()}
            with sync:
                with autocast:
                    loss = runner(batch)
                if not all_finite(loss, world):
                    raise TrainingError(
                        f"the loss is {float(loss.detach())} at step {step + 1}: lower training.lr or check the data"
                    )
                (loss / settings.grad_accumulation).backward()
            parts = {"loss": loss.detach(), **getattr(model, "last_losses", {})}
            for key, value in parts.items():
                losses[key] = losses.get(key, 0.0) + float(value) / settings.grad_accumulation
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
            means = tally.means()
            routing = routing_summary(model)
            now = time.perf_counter() - started
            examples = (step - logged[0]) * examples_per_step
            examples_per_second = examples / max(now - logged[1] - (plan.dev_seconds - logged[2]), 1e-9)
            logged = (step, now, plan.dev_seconds)
            record = {
                "step": step,
                "loss": means["loss"],
                "ce": means.get("ce", means["loss"]),
                "aux": {k: v for k, v in means.items() if k not in ("loss", "ce")},
                "lr": rate,
                "seconds": round(now, 2),
                "examples_per_second": round(examples_per_second, 2),
                **routing,
            }
            if rank == 0:
                with (run_dir / "history.jsonl").open("a") as history:
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
            save_checkpoint(run_dir / "checkpoint", model, optimizer, scheduler, meta, is_main_process=rank == 0)
    progress.close()
    if trackers is not None:
        trackers.close()

    save_adapter(model, run_dir / "adapter", is_main_process=rank == 0)
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
        (run_dir / "training.json").write_text(json.dumps(summary, indent=2))
        if routing:  # the routing of the last logged steps, for the report's expert-load plot
            final = {
                name: {"load": routing["load_per_layer"][name], "ess": ess}
                for name, ess in routing["ess_per_layer"].items()
            }
            (run_dir / "routing.json").write_text(json.dumps(final))
