"""Recipes: a YAML file that says which model, tasks, adapter and training settings a run uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from loramix.config import MixLoraConfig
from loramix.data import get_task, load_jsonl_tasks

SAMPLINGS = ("proportional", "temperature", "uniform")
SCHEDULES = ("cosine", "linear", "constant")
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"recipe key {key}={value!r} is invalid: {allowed}")


@dataclass
class Training:
    """Optimisation settings of a run."""

    steps: int = 300
    batch_size: int = 8
    grad_accumulation: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    sampling: str = "temperature"
    sampling_temperature: float = 2.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "log_every", "save_every"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"training.{name}",
                value,
                "expected an integer >= 1",
            )
        _check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "training.warmup_steps",
            self.warmup_steps,
            "expected an integer >= 0",
        )
        for name in ("lr", "weight_decay", "max_grad_norm", "sampling_temperature"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                f"training.{name}",
                value,
                "expected a number >= 0",
            )
        _check(self.lr > 0, "training.lr", self.lr, "expected a number > 0")
        _check(self.schedule in SCHEDULES, "training.schedule", self.schedule, f"allowed: {list(SCHEDULES)}")
        _check(self.sampling in SAMPLINGS, "training.sampling", self.sampling, f"allowed: {list(SAMPLINGS)}")
        _check(isinstance(self.bf16, bool), "training.bf16", self.bf16, "expected true or false")
        _check(isinstance(self.seed, int), "training.seed", self.seed, "expected an integer")


@dataclass
class Recipe:
    """A whole run: model, tasks, adapter (`mixlora` or a plain peft `lora`), training and evaluation sizes."""

    name: str
    model: str | None = None
    tasks: list[str] = field(default_factory=list)
    evaluation: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)
    data_dir: str | None = None
    max_length: int = 256
    eval_examples: int | None = 100
    mixlora: dict | None = None
    lora: dict | None = None
    training: Training = field(default_factory=Training)

    def __post_init__(self) -> None:
        if isinstance(self.training, dict):
            self.training = _build(Training, self.training, "training")
        for path in self.task_files:
            load_jsonl_tasks(path)
        _check(bool(self.tasks) and isinstance(self.tasks, list), "tasks", self.tasks, "list at least one task")
        for name in [*self.tasks, *self.evaluation]:
            get_task(name)  # raises, naming the known tasks
        _check(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "each task once")
        _check(
            (self.mixlora is None) != (self.lora is None),
            "mixlora/lora",
            (self.mixlora, self.lora),
            "give exactly one adapter section, `mixlora:` or `lora:`",
        )
        _check(
            isinstance(self.max_length, int) and self.max_length >= 32,
            "max_length",
            self.max_length,
            "expected an integer >= 32",
        )
        _check(
            self.eval_examples is None or (isinstance(self.eval_examples, int) and self.eval_examples >= 1),
            "eval_examples",
            self.eval_examples,
            "expected null (all) or an integer >= 1",
        )
        if self.lora is not None:
            unknown = sorted(set(self.lora) - set(LORA_FIELDS))
            _check(not unknown, "lora", unknown, f"unknown keys; allowed: {list(LORA_FIELDS)}")
        else:
            self.mixlora_config()  # validates

    def mixlora_config(self) -> MixLoraConfig:
        values = dict(self.mixlora)
        if values.get("router") == "task" and values.get("num_tasks") is None:
            values["num_tasks"] = len(self.tasks)
        return MixLoraConfig.from_dict(values)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown recipe key(s) {[f'{where}.{k}' if where else k for k in unknown]}; allowed: {sorted(known)}"
        )
    return cls(**values)


def apply_override(values: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override (the value read as YAML) to a recipe's raw mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override {assignment!r} is invalid: expected key=value, e.g. training.steps=50")
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of recipe keys")
    values.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(values, assignment)
    return _build(Recipe, values, "")
