"""Recipes: typed YAML files saying which model, tasks, adapter and training settings a run uses."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from loramix.compilation import BACKENDS
from loramix.config import MixLoraConfig
from loramix.continual import PreviousRun, continued_mixlora, read_previous_run
from loramix.data import get_task, load_jsonl_tasks
from loramix.data.jsonl import SPLITS
from loramix.data.sources import FIELDS, FORMATS, SOURCES, TRAIN_ON, load_data_tasks, source_of
from loramix.methods import METHODS, MethodConfig
from loramix.models import DEFAULT_MODEL, QUANTIZATIONS
from loramix.precision import BF16_SETTINGS

SAMPLINGS = ("proportional", "temperature", "uniform")
BATCHINGS = ("mixed", "task")  # rows of any tasks, or of one task per batch (less padding between short and long)
SCHEDULES = ("cosine", "linear", "constant")
SHARDINGS = ("none", "fsdp")  # fsdp: loramix.sharding
EVAL_MODES = ("choices", "generate")  # closed-label tasks by choice log-likelihood, or every task by generation
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
REPORTERS = ("tensorboard", "wandb")  # training.report_to: loramix.tracking
LORA_RESERVED = ("task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode")


def _fail(key: str, value: object, allowed: str) -> typing.NoReturn:
    raise ValueError(f"recipe key {key}={value!r} is invalid: {allowed}")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


def _conforms(value: object, hint: object) -> bool:
    """Whether a value read from YAML has the annotated type (bool is not an int, an int is a float)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_conforms(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _as_number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_types(section: object, where: str) -> None:
    """Validate every field of a recipe dataclass against its annotation; numbers in strings become floats."""
    hints = typing.get_type_hints(type(section))
    for item in fields(section):
        key, value, hint = f"{where}{item.name}", getattr(section, item.name), hints[item.name]
        if isinstance(value, str) and _conforms(1.0, hint) and not _conforms(value, hint):
            value = _as_number(value)  # YAML 1.1 reads `1e-3` as a string
            setattr(section, item.name, value)
        if not _conforms(value, hint):
            _fail(key, value, f"expected {getattr(hint, '__name__', str(hint))}")


def _at_least(section: object, where: str, names: tuple[str, ...], bound: float) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value is None or value >= bound, f"{where}{name}", value, f"expected a number >= {bound}")


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str) -> float | None:
    """Seconds of a duration like "14m", "90s", "1.5h" or "1h30m"; None if it is not one."""
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return 3600 * hours + 60 * minutes + seconds


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
    bf16: bool | str = False  # or "auto": bfloat16 autocast where it is faster (see loramix.precision)
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    # A wall-clock budget ("14m", "90s", "1h"): the run takes as many steps as fit (at most `steps`), planned
    # from the measured speed of its first CALIBRATION_STEPS steps, and its schedule is laid over them.
    time_limit: str | None = None
    dev_every: int = 50  # steps between two dev evaluations of the learning curve (with dev_examples > 0)
    # "fsdp": with several processes, shard the model's weights over them (FSDP2) instead of copying it to each
    sharding: str = "none"
    # true (inductor) or a backend name: compile each decoder block (loramix.compilation); where the backend
    # cannot compile here, the run warns and trains eagerly
    compile: bool | str = False
    # where the figures of history.jsonl and learning_curve.jsonl also go while the run trains (loramix.tracking)
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_types(self, "training.")
        if self.time_limit is not None:
            seconds = parse_duration(self.time_limit)
            _check(
                seconds is not None and seconds > 0,
                "training.time_limit",
                self.time_limit,
                "expected a duration such as '14m', '90s', '1.5h' or '1h30m'",
            )
        at_least_one = ("steps", "batch_size", "grad_accumulation", "log_every", "save_every", "dev_every")
        _at_least(self, "training.", at_least_one, 1)
        _at_least(self, "training.", ("warmup_steps", "weight_decay", "max_grad_norm"), 0)
        _check(math.isfinite(self.lr) and self.lr > 0, "training.lr", self.lr, "expected a finite number > 0")
        _check(self.bf16 in BF16_SETTINGS, "training.bf16", self.bf16, "allowed: true, false, auto")
        _check(self.schedule in SCHEDULES, "training.schedule", self.schedule, f"allowed: {list(SCHEDULES)}")
        _check(
            isinstance(self.compile, bool) or self.compile in BACKENDS,
            "training.compile",
            self.compile,
            f"allowed: true, false or a backend: {', '.join(BACKENDS)}",
        )
        _check(self.sharding in SHARDINGS, "training.sharding", self.sharding, f"allowed: {list(SHARDINGS)}")
        for name in self.report_to:
            _check(name in REPORTERS, "training.report_to", name, f"allowed: {list(REPORTERS)}")
        _check(len(set(self.report_to)) == len(self.report_to), "training.report_to", self.report_to, "list each once")


@dataclass
class Continual:
    """How a run that adds tasks to a `task`-router run (`continue_from`) adds them (loramix.continual)."""

    new_experts: int = 0  # LoRA experts per adapted layer that only the added tasks use; 0: new gate rows only
    # whether the added tasks also route over the frozen experts (false: over their new experts alone); default:
    # only when no experts are added (new experts used alone learn as a fresh run of them would: RESULTS)
    reuse_experts: bool | None = None

    def __post_init__(self) -> None:
        _check_types(self, "continual.")
        _at_least(self, "continual.", ("new_experts",), 0)
        _check(
            self.reuse_experts is not False or self.new_experts > 0,
            "continual.reuse_experts",
            self.reuse_experts,
            "a task added without new experts (continual.new_experts: 0) can only use the frozen ones: use true",
        )


@dataclass
class DataEntry:
    """One `data:` entry of a recipe: a file or dataset, its format, and (but for `rows`) the task it holds."""

    path: str  # a JSONL, parquet, CSV or JSON file, or a folder saved by `datasets` (save_to_disk)
    format: str = "rows"  # rows (today's task_files rows), chat (OpenAI's messages), alpaca, columns
    task: str | None = None  # the task's name (rows name their own)
    columns: dict | None = None  # the format's field -> the source's column, for fields named otherwise
    source: str | None = None  # default: by the path's suffix (.jsonl: read by loramix; a folder: disk)
    split: str | None = None  # the split of a `datasets` source to read (default: train; slices like train[:80%])
    use_as: str | None = None  # train, validation or test: every row's split (default: the rows', else 80/20)
    train_on: str = "all"  # chat: the loss on every assistant turn (all) or on the last one (last)


def _data_entry(values: object, where: str) -> DataEntry:
    """A `data:` entry, checked field by field (errors name `data[i].key`)."""
    entry = _build(DataEntry, values, where)
    _check_types(entry, where)
    _check(entry.format in FORMATS, f"{where}format", entry.format, f"allowed: {list(FORMATS)}")
    if entry.format == "rows":
        _check(entry.task is None, f"{where}task", entry.task, "rows name their own task; give none with format rows")
    else:
        _check(bool(entry.task), f"{where}task", entry.task, f"format {entry.format} needs the task's name")
    for key, column in (entry.columns or {}).items():
        _check(key in FIELDS[entry.format], f"{where}columns.{key}", column, f"allowed: {list(FIELDS[entry.format])}")
        _check(isinstance(column, str) and bool(column), f"{where}columns.{key}", column, "expected a column name")
    source = source_of(entry)
    suffixes = "by default from the path: .jsonl, .parquet, .csv, .json or a saved dataset's folder"
    _check(source in SOURCES, f"{where}source", entry.source or entry.path, f"allowed: {list(SOURCES)} ({suffixes})")
    _check(
        entry.split is None or source != "jsonl",
        f"{where}split",
        entry.split,
        "a JSONL file read by loramix has no splits (use_as: puts its rows in one; source: json reads it by datasets)",
    )
    _check(entry.use_as in (None, *SPLITS), f"{where}use_as", entry.use_as, f"allowed: {list(SPLITS)}")
    _check(entry.train_on in TRAIN_ON, f"{where}train_on", entry.train_on, f"allowed: {list(TRAIN_ON)}")
    return entry


@dataclass
class Recipe:
    """A whole run: model, tasks and their sampling, evaluation sizes, training, and one adapter section:
    `mixlora` (MixLoraConfig fields), `lora` (peft LoraConfig fields, a plain LoRA baseline), or `method` (a
    loramix method's name, loramix.methods) with `adapter` (its config's fields)."""

    name: str
    tasks: list[str]
    model: str = DEFAULT_MODEL
    quantization: str | None = None  # "8bit" or "4bit": the base's linear layers by bitsandbytes (loramix.models)
    evaluation: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)
    data: list[dict] = field(default_factory=list)  # users' data in other shapes and sources (DataEntry)
    data_dir: str | None = None
    sampling: str = "temperature"
    sampling_temperature: float = 2.0
    batching: str = "mixed"
    max_length: int = 256
    system_prompt: str | None = None  # None: the chat template's default
    eval_examples: int | None = 100
    eval_mode: str = "choices"  # closed-label tasks by choice log-likelihood; "generate": parse greedy answers
    dev_examples: int = 0  # per trained task, held out of its train split for the learning curve (0: no curve)
    training: Training = field(default_factory=Training)
    mixlora: dict | None = None
    lora: dict | None = None
    method: str | None = None  # a loramix method other than the mixture (`mixlora:`), configured by `adapter:`
    adapter: dict | None = None
    # a finished `task`-router run whose tasks begin `tasks`: this run adds the others (loramix.continual)
    continue_from: str | None = None
    continual: Continual = field(default_factory=Continual)
    # a finished run of the same adapter settings whose trained adapter this run starts from, e.g. to fine-tune
    # one adapter through tasks that arrive one after another (benchmarks/continual.py); its tasks are free
    init_from: str | None = None

    def __post_init__(self) -> None:
        self._previous: PreviousRun | None = None
        if isinstance(self.training, dict):
            self.training = _build(Training, self.training, "training.")
        if isinstance(self.continual, dict):
            self.continual = _build(Continual, self.continual, "continual.")
        _check_types(self, "")
        from_files = set()
        for path in self.task_files:
            from_files |= set(load_jsonl_tasks(path))  # registers the file's tasks; raises on a bad file
        entries = [_data_entry(entry, f"data[{i}].") for i, entry in enumerate(self.data)]
        for name in load_data_tasks(entries):
            _check(name not in from_files, "data", name, "a task of `data:` is also one of `task_files:`; rename one")
        _check(bool(self.tasks), "tasks", self.tasks, "list at least one task")
        _check(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "list each task once")
        for key, names in (("tasks", self.tasks), ("evaluation", self.evaluation)):
            for name in names:
                try:
                    get_task(name)
                except ValueError as error:
                    _fail(key, name, str(error))
        _check(self.sampling in SAMPLINGS, "sampling", self.sampling, f"allowed: {list(SAMPLINGS)}")
        _check(self.eval_mode in EVAL_MODES, "eval_mode", self.eval_mode, f"allowed: {list(EVAL_MODES)}")
        _check(self.batching in BATCHINGS, "batching", self.batching, f"allowed: {list(BATCHINGS)}")
        _check(self.sampling_temperature > 0, "sampling_temperature", self.sampling_temperature, "expected > 0")
        _at_least(self, "", ("max_length",), 16)
        _at_least(self, "", ("eval_examples",), 1)
        _at_least(self, "", ("dev_examples",), 0)
        if self.continue_from is not None:
            self._continuing()
        _check(
            self.init_from is None or self.continue_from is None,
            "init_from",
            self.init_from,
            "a run that adds tasks (continue_from) already starts from that run's adapter: give one of the two",
        )
        _check(
            self.continue_from is not None or self.continual.new_experts == 0,
            "continual.new_experts",
            self.continual.new_experts,
            "experts are added by a run that adds tasks: set continue_from, or use 0",
        )
        sections = {"mixlora": self.mixlora, "lora": self.lora, "adapter": self.adapter}
        _check(
            sum(section is not None for section in sections.values()) == 1,
            "mixlora/lora/adapter",
            sections,
            "give exactly one adapter section: `mixlora:`, `lora:`, or `method:` with `adapter:`",
        )
        if self.adapter is not None or self.method is not None:
            _check(
                self.method in set(METHODS) - {"mixlora"},
                "method",
                self.method,
                f"with `adapter:` name a method: {sorted(set(METHODS) - {'mixlora'})} (a mixture of LoRAs: `mixlora:`)",
            )
            _check(self.adapter is not None, "adapter", self.adapter, f"method {self.method!r} needs its settings")
        _check(
            self.quantization in QUANTIZATIONS,
            "quantization",
            self.quantization,
            f"allowed: {', '.join(map(str, QUANTIZATIONS))} (null: unquantized)",
        )
        _check(
            self.quantization is None or self.training.sharding == "none",
            "training.sharding",
            self.training.sharding,
            "a quantized base trains with sharding: none (sharding bitsandbytes weights is not supported)",
        )
        _check(
            self.training.sharding == "none" or self.mixlora is not None,
            "training.sharding",
            self.training.sharding,
            "sharding trains `mixlora:` recipes; other recipes train with sharding: none",
        )
        _check(
            not self.training.compile or self.method is None,
            "training.compile",
            self.training.compile,
            "compiling trains `mixlora:` and `lora:` recipes; set compile: false for a `method:` recipe",
        )
        _check(
            self.method is None or not METHODS[self.method].needs_held_out or self.dev_examples > 0,
            "dev_examples",
            self.dev_examples,
            f"method {self.method!r} scores itself on held-out examples during training: set dev_examples >= 1",
        )
        if self.mixlora is not None:
            self.mixlora = self.mixlora_config().to_dict()
        elif self.adapter is not None:
            self.adapter = self.adapter_config().to_dict()
        else:
            self.lora = _validate_lora(self.lora)

    def _continuing(self) -> None:
        """A run that adds tasks to a task-router run takes its adapter section from that run."""
        _check(
            self.lora is None and self.adapter is None and self.method is None,
            "continue_from",
            self.continue_from,
            "a run that adds tasks takes its adapter from the run it continues: give no lora, method or adapter",
        )
        _check(
            self.training.weight_decay == 0,
            "training.weight_decay",
            self.training.weight_decay,
            "a run that adds tasks keeps the old tasks exactly as they were: weight decay must be 0",
        )
        if self.mixlora is None:  # when the run's recipe.yaml is read back, it holds the section
            self.mixlora = continued_mixlora(
                self.previous_run(), self.tasks, self.continual.new_experts, self.continual.reuse_experts is True
            )

    def previous_run(self) -> PreviousRun:
        """The run this recipe continues (`continue_from`), read and checked once (loramix.continual)."""
        if self._previous is None:
            self._previous = read_previous_run(self.continue_from, self.tasks, self.model, self.quantization)
        return self._previous

    @property
    def method_name(self) -> str:
        """The run's method: `lora` (peft), `mixlora` or a loramix method's name."""
        return "lora" if self.lora is not None else "mixlora" if self.mixlora is not None else self.method

    def adapter_config(self) -> MethodConfig:
        """The loramix adapter's config (a `lora:` recipe has none: peft builds it)."""
        if self.lora is not None:
            raise ValueError(f"recipe {self.name!r} trains a peft LoRA (`lora:`), not a loramix adapter")
        if self.mixlora is not None:
            return self.mixlora_config()
        config_class = METHODS[self.method].config_class
        values = dict(self.adapter)
        if "num_tasks" in {f.name for f in fields(config_class)}:
            values = {"num_tasks": len(self.tasks)} | values
        unknown = sorted(set(values) - {f.name for f in fields(config_class)})
        if unknown:
            _fail(f"adapter.{unknown[0]}", values[unknown[0]], f"unknown key; allowed: {_names(config_class)}")
        try:
            return config_class.from_dict(values)
        except ValueError as error:
            raise ValueError(f"recipe section adapter (method {self.method}): {error}") from None

    def mixlora_config(self) -> MixLoraConfig:
        """The adapter's config; `num_tasks` defaults to the number of tasks (task id = index in `tasks`)."""
        if self.mixlora is None:
            raise ValueError(f"recipe {self.name!r} has no `mixlora:` section (its method: {self.method_name})")
        values = {"num_tasks": len(self.tasks)} | dict(self.mixlora)
        unknown = sorted(set(values) - {f.name for f in fields(MixLoraConfig)})
        if unknown:
            _fail(f"mixlora.{unknown[0]}", values[unknown[0]], f"unknown key; allowed: {_names(MixLoraConfig)}")
        try:
            config = MixLoraConfig.from_dict(values)
        except ValueError as error:
            raise ValueError(f"recipe section mixlora: {error}") from None
        _check(
            config.num_tasks is None or config.num_tasks >= len(self.tasks),
            "mixlora.num_tasks",
            config.num_tasks,
            f"expected at least the {len(self.tasks)} tasks of the recipe",
        )
        return config

    @classmethod
    def from_dict(cls, values: dict) -> Recipe:
        """A recipe from a mapping as read from YAML; unknown keys raise ValueError."""
        return _build(cls, values, "")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _names(cls: type) -> list[str]:
    return sorted(f.name for f in fields(cls))


def _validate_lora(values: dict) -> dict:
    """The `lora:` section completed with defaults, checked against peft's LoraConfig."""
    from peft import LoraConfig

    allowed = sorted(set(_names(LoraConfig)) - set(LORA_RESERVED))
    values = LORA_DEFAULTS | values
    for key, value in values.items():
        _check(key in allowed, f"lora.{key}", value, f"unknown key; allowed: {allowed}")
    r, alpha, dropout = values["r"], values["lora_alpha"], values["lora_dropout"]
    _check(_conforms(r, int) and r >= 1, "lora.r", r, "expected an integer >= 1")
    _check(_conforms(alpha, float) and alpha > 0, "lora.lora_alpha", alpha, "expected a number > 0")
    _check(_conforms(dropout, float) and 0 <= dropout < 1, "lora.lora_dropout", dropout, "expected 0 <= x < 1")
    try:
        LoraConfig(task_type="CAUSAL_LM", **values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe section lora: {error}") from None
    return values


def _build(cls: type, values: object, where: str):
    if not isinstance(values, dict):
        _fail(where.rstrip(".") or "recipe", values, "expected a mapping of keys to values")
    allowed = _names(cls)
    for key, value in values.items():
        _check(key in allowed, f"{where}{key}", value, f"unknown key; allowed: {allowed}")
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
            raise ValueError(f"override {assignment!r} is invalid: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, validate everything (ValueError names the bad key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    values = dict(values) if isinstance(values, dict) else values
    if isinstance(values, dict):
        values.setdefault("name", path.stem)
        for assignment in overrides:
            apply_override(values, assignment)
        if "tasks" not in values:
            raise ValueError(f"{path} lists no `tasks`: a recipe needs at least one task to train on")
    return Recipe.from_dict(values)
