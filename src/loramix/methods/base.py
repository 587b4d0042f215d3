"""What every loramix method shares: the method registry, config validation and files, and AdaptedModel, the
wrapper around a frozen Hugging Face causal LM (forward, generate, loss, save, load, unload)."""

from __future__ import annotations

import inspect
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from loramix.call import CallState
from loramix.card import CARD_NAME, is_loramix_card, model_card, write_card
from loramix.compilation import eager_if_compiled
from loramix.files import atomic_write, read_json
from loramix.sharding import full, root_gathered

CONFIG_NAME = "loramix_config.json"
WEIGHTS_NAME = "adapter.safetensors"
METHODS: dict[str, type[AdaptedModel]] = {}  # method name -> its model class (`config_class` is its config)
WRAPPED = "_loramix_method"  # set on a base model while an adapter wraps it


def register_method(name: str, config_class: type):
    """Class decorator: make an AdaptedModel subclass the method `name` (recipes' `method:`), configured by
    `config_class` (a MethodConfig dataclass)."""

    def add(cls: type[AdaptedModel]) -> type[AdaptedModel]:
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
        METHODS[name] = cls
        cls.method, cls.config_class = name, config_class
        config_class.method = name
        return cls

    return add


def method_class(name: str) -> type[AdaptedModel]:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not a loramix method; allowed: {sorted(METHODS)}")
    return METHODS[name]


class MethodConfig(ABC):
    """Shared behaviour of the methods' config dataclasses: errors that name the field, the value and what is
    allowed; JSON files that say which method they configure."""

    method: ClassVar[str]

    def _fail(self, name: str, value: object, allowed: str) -> NoReturn:
        raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: {allowed}")

    def _check_integers(self, names: Iterable[str], minimum: int = 1) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                self._fail(name, value, f"expected an integer >= {minimum}")

    def _check_numbers(self, names: Iterable[str], minimum: float = 0.0, strict: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < minimum or (strict and value == minimum):
                self._fail(name, value, f"expected a finite number {'>' if strict else '>='} {minimum}")

    def _check_choice(self, name: str, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        if getattr(self, name) not in allowed:
            self._fail(name, getattr(self, name), f"allowed: {allowed}")

    def _check_targets(self) -> None:
        """`target_modules` (suffixes or 'all-linear') and `layers_to_transform` (None or layer indices)."""
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                self.target_modules = [targets]
        elif isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
            self.target_modules = list(targets)
        else:
            self._fail("target_modules", targets, "expected a list of module-name suffixes or 'all-linear'")
        if not self.target_modules:
            self._fail("target_modules", self.target_modules, "name at least one module suffix, or 'all-linear'")
        self._check_layers()

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, (list, tuple))
            and layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            self._fail("layers_to_transform", layers, "expected None or a non-empty list of layer indices >= 0")
        if layers is not None:
            self.layers_to_transform = sorted(set(layers))

    @abstractmethod
    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        """((method, paper), the settings a reader of the adapter's model card needs to know what was trained)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        """The config as JSON, with the method it configures (read back by `read_config`)."""
        Path(path).write_text(json.dumps({"method": self.method, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path):
        values = read_json(Path(path))
        method = values.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{path} configures the method {method!r}, not {cls.method!r}")
        return cls.from_dict(values)


def read_config(path: str | Path) -> MethodConfig:
    """The config in a loramix_config.json, of the method it names (files without one: a mixture of LoRAs)."""
    values = read_json(Path(path))
    method = values.pop("method", "mixlora")
    try:
        return method_class(method).config_class.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


class AdaptedModel(nn.Module):
    """A frozen Hugging Face causal LM with one method's adapter; only the adapter's parameters train.

    Subclasses add their modules in `__init__` (replacing layers or adding hooks with `_add_hook`) and remove
    them in `_remove_adapter`. The base model is called by `forward`, `generate` and, through the hooks, by
    any caller of `base_model` directly (evaluation does); `self.context` (a CallState) carries each call's
    task ids and masks to the adapter's modules.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]
    needs_task_ids = False  # whether every call must give task ids
    starts_as_base = True  # whether a freshly wrapped model computes exactly what the base model computes
    needs_held_out = False  # whether training needs held-out batches (a recipe's dev_examples) for the method
    accepts_loss_kwargs = False  # for transformers.Trainer: the loss is a mean over the batch's labelled tokens

    def __init__(self, model: nn.Module, config: MethodConfig, context: CallState | None = None) -> None:
        super().__init__()
        if getattr(model, WRAPPED, None):
            raise ValueError(
                f"this model is already wrapped by a loramix {getattr(model, WRAPPED)} adapter; call unload() first"
            )
        self.base_model = model
        self.method_config = config
        self.context = context if context is not None else CallState()
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        setattr(model, WRAPPED, self.method)
        self._hooks: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []
        self._add_hook("", model.register_forward_pre_hook(self._start_forward(), with_kwargs=True))
        parameters = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep, self._takes_use_cache = "logits_to_keep" in parameters, "use_cache" in parameters

    def __getattr__(self, name: str):
        """nn.Module's attributes first, then the base model's, as peft's PeftModel does: tools written for Hugging
        Face models (Trainer, TRL) find what they call (add_model_tags, enable_input_require_grads, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or name.startswith("__"):  # copy/pickle protocols must not reach the base
                raise
            return getattr(self.base_model, name)

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """Refused: recomputing the adapted layers in the backward would run them without the call state of
        their forward (routes, prompt vectors); Trainer calls this when gradient_checkpointing=True."""
        raise ValueError(
            "gradient checkpointing is not supported by loramix: the backward would recompute the adapted layers "
            "without the routing of their forward; set gradient_checkpointing=False (TRL's SFTConfig turns it on "
            "by default)"
        )

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5

    @property
    def config(self):
        """The base model's (Hugging Face) config, which tools that drive a model (Trainer, TRL, generation) read;
        the adapter's own is `method_config`, as peft's is `peft_config`."""
        return self.base_model.config

    def _add_hook(self, module_name: str, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append((module_name, handle))

    # ---- call inputs --------------------------------------------------------------------------------------
    # Hooks are closures over the context, not bound methods: a deep copy of the base model (merging) must not
    # copy this wrapper along with them.
    def _start_forward(self):
        context = self.context

        def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
            context.new_forward(kwargs.get("attention_mask"))

        return start

    def _check_task_ids(self, task_ids: Tensor | None) -> None:
        if task_ids is None:
            if self.needs_task_ids:
                raise ValueError(f"this {self.method} adapter needs task_ids: a LongTensor of shape (batch,)")
            return
        if not isinstance(task_ids, Tensor) or task_ids.is_floating_point() or task_ids.dim() != 1:
            raise ValueError(f"task_ids must be an integer tensor of shape (batch,), got {task_ids!r}")
        limit = getattr(self.method_config, "num_tasks", None)
        if limit is not None and task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= limit):
            raise ValueError(f"task ids must lie in [0, {limit}) (num_tasks={limit}), got {task_ids.tolist()}")

    @contextmanager
    def _call_inputs(self, task_ids: Tensor | None, prompt_mask: Tensor | None, generating: bool = False):
        self._check_task_ids(task_ids)
        self.context.start_call(task_ids, prompt_mask, generating)
        try:  # decoding steps run compiled blocks eagerly (a growing key-value cache would recompile them), and
            # call the base model, not this wrapper's forward, so a sharded wrapper's own weights stay gathered
            with (
                eager_if_compiled(self) if generating else nullcontext(),
                root_gathered(self) if generating else nullcontext(),
            ):
                yield
        finally:
            self.context.start_call(None, None, False)

    # ---- the model's API ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        **inputs,
    ):
        """The base model's output; `prompt_mask` marks the tokens that prompt-level modules pool over
        (default: every real token).

        With `labels` (-100: not scored) the output holds only `.loss`: `compute_loss`'s training loss, as
        transformers.Trainer and TRL optimise it.
        """
        if labels is not None:
            if prompt_mask is not None or inputs:
                extra = sorted([*inputs, *(["prompt_mask"] if prompt_mask is not None else [])])
                raise ValueError(
                    f"with labels, forward computes the training loss from input_ids, attention_mask, labels and "
                    f"task_ids only (the prompt is what has no label); also got {extra}"
                )
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}
            return CausalLMOutputWithPast(loss=self.compute_loss({k: v for k, v in batch.items() if v is not None}))
        with self._call_inputs(task_ids, prompt_mask):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **inputs)

    def generate(self, *args, task_ids: Tensor | None = None, **kwargs):
        """`generate` of the base model; what the adapter computes once per prompt is computed on the prompt and
        reused by every decoding step."""
        with self._call_inputs(task_ids, None, generating=True):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def prompt_routing(self, task_ids: Tensor | None = None):
        """Forwards of `base_model` inside share one call, as the steps of `generate` do: what is computed once
        per sequence (routes, prompt vectors) comes from the first forward (the prompt) and serves the next ones
        (which continue it through the key-value cache); `select_rows` re-indexes it with the cache's rows."""
        with self._call_inputs(task_ids, None, generating=True):
            yield

    def select_rows(self, rows: Tensor) -> None:
        """Inside `prompt_routing`: the next forwards continue batch rows `rows` of the previous one."""
        self.context.select_rows(rows)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy on the labelled tokens (+ the method's auxiliary losses).

        `batch` holds input_ids, attention_mask, labels (-100 = ignored) and optionally task_ids.
        """
        token_losses, _ = self.labelled_token_losses(batch)
        loss = token_losses.sum() / max(len(token_losses), 1)
        parts = {"ce": loss.detach()}
        total = loss + self._auxiliary_losses(parts)
        self.last_losses = parts
        return total

    def labelled_token_losses(self, batch: dict[str, Tensor], samples: int = 1, repeated=None) -> tuple[Tensor, Tensor]:
        """(cross-entropy of every labelled token, the batch row of each), the batch run `samples` times (rows
        repeated; `repeated(inputs)` is the context in which the model repeats them itself, if it does).

        Only the positions that predict a labelled token get the (vocabulary-sized) output projection; training
        builds no key-value cache.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        task_ids = batch.get("task_ids")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if samples > 1:
            labels = labels.repeat(samples, 1)
            task_ids = task_ids.repeat(samples) if task_ids is not None else None
            if repeated is None:
                inputs = {key: value.repeat(samples, 1) for key, value in inputs.items()}
        prompt_mask = attention_mask.repeat(samples, 1).bool() & (labels == -100)
        predicts_label = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
        if self._takes_logits_to_keep:
            inputs["logits_to_keep"] = predicts_label
        if self._takes_use_cache:
            inputs["use_cache"] = False
        with repeated() if repeated is not None else nullcontext():
            logits = self(task_ids=task_ids, prompt_mask=prompt_mask, **inputs).logits
        if not self._takes_logits_to_keep:
            logits = logits[predicts_label]
        token_losses = F.cross_entropy(logits.float(), labels[:, 1:][predicts_label[:, :-1]], reduction="none")
        return token_losses, predicts_label.nonzero()[:, 0]

    @contextmanager
    def _repeated_from(self, block: str, samples: int, rows: int):
        """Forwards of a batch of `rows` rows inside run the blocks before `block` once: from `block` on, every
        block sees its inputs (hidden states, masks, every batch-sized tensor) repeated `samples` times, so that
        samples of a batch that differ only in the adapted blocks share the frozen blocks below them."""
        prefix, first = block.rsplit(".", 1)
        blocks = list(self.base_model.get_submodule(prefix))[int(first) :]

        def repeat(value):
            if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == rows:
                return value.repeat(samples, *([1] * (value.dim() - 1)))
            if isinstance(value, tuple):
                return tuple(repeat(item) for item in value)
            return value

        def repeat_inputs(module: nn.Module, args: tuple, kwargs: dict):
            self._repeat_call_state(repeat)
            return repeat(args), {key: repeat(value) for key, value in kwargs.items()}

        # prepended: other hooks on the same blocks (a prompt router's) must see the repeated inputs
        handles = [b.register_forward_pre_hook(repeat_inputs, with_kwargs=True, prepend=True) for b in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _repeat_call_state(self, repeat: Callable) -> None:
        """Repeat (with `repeat`) the batch-sized values the method keeps for the current call, if any."""

    def _auxiliary_losses(self, parts: dict[str, Tensor]) -> Tensor | float:
        """The method's losses besides the cross-entropy (their values detached into `parts`)."""
        return 0.0

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer, held_out: Callable) -> None:
        """Called by `loramix train` after each optimizer step; `held_out()` gives batches not trained on
        (methods that reshape themselves during training, as ALoRA's rank allocation, use it)."""

    # ---- statistics ---------------------------------------------------------------------------------------
    def routers(self) -> dict:
        """Each adapted module's name -> its router (methods without routers: none)."""
        return {}

    def routing_stats(self) -> dict[str, dict]:
        return {}

    def reset_routing_stats(self) -> None:
        pass

    def count_parameters(self) -> dict[str, int]:
        """{"trainable": parameters that train, "active_per_token": adapter parameters one token uses}."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "active_per_token": trainable}

    # ---- saving and loading -------------------------------------------------------------------------------
    def adapter_buffers(self) -> dict[str, Tensor]:
        """Buffers that are part of the adapter (saved and loaded with it), by name in this model; none unless
        the method keeps state besides its parameters (as ALoRA its rank gates)."""
        return {}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable tensors and the adapter's buffers, named as in the saved file; whole tensors also when
        the model is sharded (then a collective: call it on every rank)."""
        prefix = "base_model."
        tensors = {name: p for name, p in self.named_parameters() if p.requires_grad} | self.adapter_buffers()
        return {name.removeprefix(prefix): full(t.detach()).contiguous() for name, t in tensors.items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load tensors saved by `adapter_state_dict`; every name and shape must match."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [
            f"{n}: {tuple(state[n].shape)} != {tuple(own[n].shape)}"
            for n in own
            if n in state and state[n].shape != own[n].shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not match this model and config: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        parameters = dict(self.named_parameters()) | dict(self.named_buffers())
        with torch.no_grad():
            for name, tensor in state.items():
                target = parameters.get("base_model." + name, parameters.get(name))
                target.copy_(tensor)

    def save_pretrained(self, directory: str | Path, is_main_process: bool = True) -> None:
        """Write loramix_config.json and adapter.safetensors (the adapter's tensors only), atomically, and a
        model card (README.md) unless the folder holds one that loramix did not write. A sharded model is saved
        by calling this on every rank; only the one with `is_main_process` writes (as in transformers)."""
        from safetensors.torch import save_file

        state = {name: tensor.cpu() for name, tensor in self.adapter_state_dict().items()}
        if not is_main_process:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = getattr(getattr(self.base_model, "config", None), "_name_or_path", "") or ""
        metadata = {"format": "pt", "library": "loramix", "method": self.method, "base_model": str(base)}
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata=metadata))
        atomic_write(directory / CONFIG_NAME, self.method_config.to_json)
        if is_loramix_card(directory / CARD_NAME):  # a README.md of the user's own is kept
            write_card(directory, model_card(base or None, *self.method_config.card_details()))

    def _remove_adapter(self) -> None:
        """Take the method's modules out of the base model (its hooks are removed by `unload`)."""

    def unload(self) -> nn.Module:
        """Remove the adapter and its hooks and return the base model as it was before `wrap`."""
        for _, handle in self._hooks:
            handle.remove()
        self._remove_adapter()
        self._hooks.clear()
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        if WRAPPED in vars(self.base_model):
            delattr(self.base_model, WRAPPED)
        return self.base_model


def backbone(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a loramix AdaptedModel or a peft model (or the model itself)."""
    if isinstance(model, AdaptedModel):
        return model.base_model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hooks_removed(copy: nn.Module, hooks: list[tuple[str, torch.utils.hooks.RemovableHandle]]) -> nn.Module:
    """A deep copy of an adapted base model without the adapter's hooks and mark (so it runs on its own)."""
    for module_name, handle in hooks:
        module = copy.get_submodule(module_name)
        for registered in (
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
        ):
            registered.pop(handle.id, None)
    if WRAPPED in vars(copy):
        delattr(copy, WRAPPED)
    return copy
