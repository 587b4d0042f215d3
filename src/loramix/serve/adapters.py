"""Adapters served by name beside a run's own (`--adapter NAME=PATH`, `POST /v1/load_lora_adapter`): many adapters
of separate trainings on one backbone, loaded and unloaded while the server runs.

LoRA-like adapters (peft LoRA folders of any rank; each task of a `task`-router run, a LoRA of rank n r) share one
running batch: each row carries its own adapter's factors (padded to the batch's largest rank), and each adapted
linear layer adds x A_row B_row for every row with two batched products, as Punica's and S-LoRA's kernels do.
Other adapters (token-level routers, `prompt`, PEDRO, IAPT, AdaLink, ALoRA) each decode in a running batch of
their own, on a module tree that shares the backbone's frozen weights; the engine steps every batch in turn.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from loramix.call import RowState
from loramix.export import task_factors
from loramix.model import MixLoraModel
from loramix.run_folder import PEFT_CONFIG_NAME, RunFolder
from loramix.serve.runners import AdaptedRunner, Runner, last_logits
from loramix.targets import linear_features, replace_module

LORA_RUNNER = "lora"  # the runner key of the batch that LoRA-like adapters share


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its parameters and buffers (no new weights)."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass
class LoraFactors:
    """One LoRA-like tenant: per module, (A^T (d_in, r), (scale B)^T (r, d_out)), ready for batched products."""

    modules: dict[str, tuple[Tensor, Tensor]]


class LoraRows:
    """The per-row factors of the rows in the current forward of the shared LoRA batch (set by its runner)."""

    def __init__(self) -> None:
        self.down: dict[str, Tensor] = {}  # module -> (B, d_in, r)
        self.up: dict[str, Tensor] = {}  # module -> (B, r, d_out)


class MultiLoraLinear(nn.Module):
    """y = W0 x + (x A_row) B_row for every row, each row with its own adapter's factors (zero rank: W0 x alone)."""

    def __init__(self, base_layer: nn.Module, name: str, rows: LoraRows) -> None:
        super().__init__()
        self.base_layer, self.name, self.rows = base_layer, name, rows

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        down = self.rows.down.get(self.name)
        if down is None:
            return result
        hidden = torch.bmm(x.to(down.dtype), down)
        return result + torch.bmm(hidden, self.rows.up[self.name]).to(result.dtype)


class LoraRowState(RowState):
    """The rows' factors as a RowState: rows join with their ranks padded to the largest, and zero factors for the
    modules their adapter does not adapt."""

    @staticmethod
    def join(states: Sequence[RowState]) -> LoraRowState:
        slots = torch.cat([state.values["slots"] for state in states])
        joined: dict[str, dict[str, Tensor]] = {"down": {}, "up": {}}
        modules = {module for state in states for module in state.values["down"]}
        for module in modules:
            reference_down = next(s.values["down"][module] for s in states if module in s.values["down"])
            reference_up = next(s.values["up"][module] for s in states if module in s.values["up"])
            rank = max(s.values["down"][module].shape[2] for s in states if module in s.values["down"])
            downs, ups = [], []
            for state in states:
                rows = len(state.values["slots"])
                down = state.values["down"].get(module, reference_down.new_zeros(rows, reference_down.shape[1], 0))
                up = state.values["up"].get(module, reference_up.new_zeros(rows, 0, reference_up.shape[2]))
                downs.append(F.pad(down, (0, rank - down.shape[2])))
                ups.append(F.pad(up, (0, 0, 0, rank - up.shape[1])))
            joined["down"][module], joined["up"][module] = torch.cat(downs), torch.cat(ups)
        return LoraRowState({"slots": slots, **joined})


class MultiLoraRunner(Runner):
    """The shared batch of LoRA-like tenants: `task_ids` are the tenants' slots; each row brings its factors."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.rows = LoraRows()
        self.tenants: dict[int, LoraFactors] = {}
        self.layers: dict[str, MultiLoraLinear] = {}

    def install(self, factors: LoraFactors) -> None:
        """Put a MultiLoraLinear in every module the tenant adapts that has none yet."""
        for name in factors.modules:
            if name not in self.layers:
                self.layers[name] = MultiLoraLinear(self.backbone.get_submodule(name), name, self.rows)
                replace_module(self.backbone, name, self.layers[name])

    def state_of(self, slots: Tensor) -> LoraRowState:
        """The factors of rows whose tenants are `slots`, padded to their largest rank."""
        tenants = [self.tenants[int(slot)] for slot in slots.tolist()]
        states = []
        for slot, tenant in zip(slots.tolist(), tenants, strict=True):
            down = {module: a.unsqueeze(0) for module, (a, _) in tenant.modules.items()}
            up = {module: b.unsqueeze(0) for module, (_, b) in tenant.modules.items()}
            states.append(LoraRowState({"slots": torch.tensor([slot]), "down": down, "up": up}))
        return LoraRowState.join(states)

    def forward(self, input_ids, attention_mask, position_ids, cache, task_ids, state):
        if state is None:
            state = self.state_of(task_ids)
        self.rows.down, self.rows.up = state.values["down"], state.values["up"]
        try:
            return last_logits(self.backbone, input_ids, attention_mask, position_ids, cache), state
        finally:
            self.rows.down, self.rows.up = {}, {}


@dataclass
class ServedAdapter:
    """An adapter served by name: its folder, its tasks (model ids NAME or NAME/TASK), and where its rows run."""

    name: str
    path: Path
    tasks: list[str]  # [] for an adapter with one task: its model id is its name
    runner: Hashable  # LORA_RUNNER, or the key of its own runner
    task_ids: list[int] = field(default_factory=list)  # per task: its slot (LoRA-like) or its task id
    model: nn.Module | None = None  # an adapter with a runner of its own

    def model_ids(self) -> list[str]:
        return [self.name] if not self.tasks else [f"{self.name}/{task}" for task in self.tasks]


def read_lora_factors(path: Path, backbone: nn.Module) -> LoraFactors:
    """A peft LoRA folder as factors for `backbone`; ValueError names what does not fit (method, module, shape)."""
    try:
        config = json.loads((path / PEFT_CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a peft adapter folder ({error})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise ValueError(f"{path}: only plain peft LoRA adapters are served (no DoRA, no modules_to_save)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{path}: adapter_model.safetensors is missing (only safetensors are loaded)")
    tensors = load_file(weights)
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    parameter = next(backbone.parameters())
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        try:
            layer = backbone.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{path}: base-model mismatch: this server's base model has no module {module}") from None
        d_in, d_out = linear_features(layer)
        if down.shape[1] != d_in or up.shape[0] != d_out:
            raise ValueError(
                f"{path}: base-model mismatch: {module} is {d_in} -> {d_out} here, the adapter's factors are "
                f"{down.shape[1]} -> {up.shape[0]}"
            )
        suffix = module.rsplit(".", 1)[-1]
        r = rank_pattern.get(module, rank_pattern.get(suffix, rank))
        a = alpha_pattern.get(module, alpha_pattern.get(suffix, alpha))
        scale = a / r**0.5 if config.get("use_rslora") else a / r
        modules[module] = (
            down.T.to(parameter).contiguous(),
            (up.T * scale).to(parameter).contiguous(),
        )
    if not modules:
        raise ValueError(f"{path}: the adapter holds no LoRA factors")
    return LoraFactors(modules)


class AdapterSet:
    """The adapters served by name on one backbone: loading (from a folder), resolving model ids, unloading, and
    keeping at most `max_adapters` resident (the least recently used ones are dropped, and reloaded from their
    folder when asked for again, as in S-LoRA).

    `backbone`: the base model without any adapter (its weights are shared, never copied); `base_name`: the base
    model a run folder must name to be served. Call `load` and `unload` under the engine's lock.
    """

    def __init__(self, backbone: nn.Module, base_name: str | None, max_adapters: int | None = None) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise ValueError(f"max_adapters={max_adapters} must be >= 1 (or None: no limit)")
        self.template, self.base_name, self.max_adapters = shared_copy(backbone), base_name, max_adapters
        self.lora = MultiLoraRunner(shared_copy(backbone))
        self.served: OrderedDict[str, ServedAdapter] = OrderedDict()  # resident, least recently used first
        self.known: dict[str, Path] = {}  # every adapter by name, resident or not
        self._slots = itertools.count()

    def prepare(self, name: str, path: str | Path) -> tuple[ServedAdapter, Runner | None]:
        """Read an adapter folder (no lock needed): its ServedAdapter and, for one with a runner of its own, that
        runner. ValueError names what is wrong (a missing folder, an unknown format, a base-model mismatch)."""
        path = Path(path)
        if not name or "/" in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and have no '/'")
        if not path.is_dir():
            raise ValueError(f"adapter {name}: {path} is not a folder")
        if (path / PEFT_CONFIG_NAME).is_file():
            return self._lora_adapter(name, path, path), None
        run = RunFolder(path)
        if not run.recipe_file.is_file():
            raise ValueError(f"adapter {name}: {path} is neither a peft LoRA folder nor a loramix run folder")
        recipe = run.saved_recipe()
        tasks = recipe.tasks
        if self.base_name is not None and recipe.model != self.base_name or recipe.quantization:
            raise ValueError(
                f"adapter {name}: base-model mismatch: the run trained on {recipe.model!r}"
                f"{' quantized' if recipe.quantization else ''}, this server serves {self.base_name!r}"
            )
        if (run.adapter_dir / PEFT_CONFIG_NAME).is_file():  # a peft LoRA run: one adapter for all its tasks
            return self._lora_adapter(name, path, run.adapter_dir), None
        model = run.load_adapter(shared_copy(self.template))
        model.to(next(self.template.parameters()).dtype).eval()
        if isinstance(model, MixLoraModel) and model.mixlora_config.router == "task":
            slots = []
            for task in range(len(tasks)):
                modules, scale = task_factors(model, task)
                parameter = next(self.template.parameters())
                factors = {
                    m: (a.T.to(parameter).contiguous(), (b.T * scale).to(parameter).contiguous())
                    for m, (a, b) in modules.items()
                }
                slots.append(self._register(LoraFactors(factors)))
            model.unload()
            return ServedAdapter(name, path, tasks if len(tasks) > 1 else [], LORA_RUNNER, slots), None
        key = ("adapter", name, next(self._slots))
        served = ServedAdapter(name, path, tasks if len(tasks) > 1 else [], key, list(range(len(tasks))), model)
        return served, AdaptedRunner(model)

    def _lora_adapter(self, name: str, path: Path, lora_dir: Path) -> ServedAdapter:
        """A peft LoRA folder (`lora_dir`) served as one LoRA-like tenant."""
        slot = self._register(read_lora_factors(lora_dir, self.template))
        return ServedAdapter(name, path, [], LORA_RUNNER, [slot])

    def _register(self, factors: LoraFactors) -> int:
        slot = next(self._slots)
        self.lora.tenants[slot] = factors
        return slot

    def add(self, served: ServedAdapter) -> list[ServedAdapter]:
        """Make a prepared adapter resident (installing its layers); returns the adapters evicted to make room."""
        if served.runner == LORA_RUNNER:
            for slot in served.task_ids:
                self.lora.install(self.lora.tenants[slot])
        self.served[served.name] = served
        self.known[served.name] = served.path
        evicted = []
        while self.max_adapters is not None and len(self.served) > self.max_adapters:
            evicted.append(self.drop(next(iter(self.served))))
        return evicted

    def drop(self, name: str) -> ServedAdapter:
        """Stop serving `name` (rows already decoding keep their factors and finish)."""
        served = self.served.pop(name)
        if served.runner == LORA_RUNNER:
            for slot in served.task_ids:
                self.lora.tenants.pop(slot, None)
        return served

    def forget(self, name: str) -> ServedAdapter | None:
        """Unload `name` for good: neither resident nor reloadable."""
        self.known.pop(name)
        return self.drop(name) if name in self.served else None

    def touch(self, name: str) -> None:
        self.served.move_to_end(name)

    def model_ids(self) -> list[str]:
        return [model for name in self.known for model in self._ids(name)]

    def _ids(self, name: str) -> list[str]:
        served = self.served.get(name)
        return served.model_ids() if served is not None else [name]

    def resolve(self, model: str) -> tuple[str, int | None] | None:
        """(adapter name, task index or None for its only task) that `model` names, None if none does; a task name
        alone that several adapters have is a ValueError listing the choices."""
        name, _, task = model.partition("/")
        if name in self.known:
            served = self.served.get(name)
            if served is None:  # not resident: the model id is checked once it is loaded again
                return name, task or None
            if task and task in served.tasks:
                return name, served.tasks.index(task)
            if not task and not served.tasks:
                return name, None
            return None
        owners = [n for n, s in self.served.items() if model in s.tasks]
        if len(owners) > 1:
            choices = [f"{owner}/{model}" for owner in owners]
            raise ValueError(
                f"the model {model!r} is ambiguous: it is a task of several adapters; name one of {choices}"
            )
        return (owners[0], self.served[owners[0]].tasks.index(model)) if owners else None
