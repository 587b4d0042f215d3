"""wrap(model, config): a Hugging Face causal LM with mixture-of-LoRA layers; save, load, merge."""

from __future__ import annotations

import copy
import inspect
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

from loramix.card import CARD_NAME, is_loramix_card, mixture_details, mixture_method, model_card, write_card
from loramix.compilation import compile_blocks, eager_if_compiled
from loramix.config import MixLoraConfig
from loramix.files import atomic_write
from loramix.layer import MixLoraLinear, active_expert_outputs, linear_features
from loramix.losses import (
    ExpertMemoryQueue,
    expert_contrastive_loss,
    load_balance_loss,
    rloo_surrogate,
    router_z_loss,
    selection_log_prob,
)
from loramix.routing import ROUTERS, Router, RoutingContext
from loramix.routing.base import BlockInput, ExpertSample, capture_block_input
from loramix.sharding import full, root_gathered

CONFIG_NAME = "loramix_config.json"
WEIGHTS_NAME = "adapter.safetensors"
_DECODER_LAYER = re.compile(r"^(.*?\.\d+)\.")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers loramix can adapt (nn.Linear, Conv1D), the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and not isinstance(module, MixLoraLinear)
    ]


def find_targets(model: nn.Module, target_modules: list[str] | str, layers: list[int] | None = None) -> list[str]:
    """The names of the layers selected by `target_modules` (suffixes or 'all-linear') inside the numbered
    decoder layers `layers` (None: anywhere)."""
    candidates = linear_layer_names(model)
    if layers is not None:
        candidates = _in_layers(candidates, layers)
    if target_modules == "all-linear":
        return candidates
    selected = [name for name in candidates if any(name == t or name.endswith("." + t) for t in target_modules)]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in selected)]
    if missing:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(
            f"target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers end in {suffixes} (for example {candidates[:3]}), or use 'all-linear'"
        )
    return selected


def _in_layers(names: list[str], layers: list[int]) -> list[str]:
    """The names inside a numbered block (`...layers.3.` / `...h.3.`) whose number is in `layers`."""
    numbers = {name: int(match.group(1).rsplit(".", 1)[1]) for name in names if (match := _DECODER_LAYER.match(name))}
    found = sorted(set(numbers.values()))
    missing = sorted(set(layers) - set(found))
    if missing:
        raise ValueError(
            f"MixLoraConfig.layers_to_transform={layers} names layers {missing} that the model does not have; "
            f"its decoder layers are numbered {found[0] if found else '-'} to {found[-1] if found else '-'}"
        )
    return [name for name in names if numbers.get(name) in layers]


def decoder_layer_of(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'model.layers.3' (the enclosing numbered block)."""
    match = _DECODER_LAYER.match(name)
    if match is None:
        raise ValueError(f"the 'prompt' router groups modules by decoder layer, but {name!r} is in none")
    return match.group(1)


class MixLoraModel(nn.Module):
    """A frozen causal LM whose target linear layers are MixLoraLinear; only experts and routers train."""

    def __init__(self, model: nn.Module, config: MixLoraConfig) -> None:
        super().__init__()
        if any(isinstance(m, MixLoraLinear) for m in model.modules()):
            raise ValueError("this model is already wrapped by loramix; call unload() first")
        self.base_model = model
        self.mixlora_config = config
        self.context = RoutingContext()
        self.shared_routers = nn.ModuleDict()
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self._hooks: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []
        self.layers: dict[str, MixLoraLinear] = {}
        targets = find_targets(model, config.target_modules, config.layers_to_transform)
        if config.router == "prompt":
            self._wrap_by_decoder_layer(targets)
        else:
            self._wrap_each(targets)
        self.memory_queues = nn.ModuleDict()
        if config.contrastive_loss_weight > 0:
            self._add_memory_queues()
        self._add_hook("", model.register_forward_pre_hook(self._start_forward(), with_kwargs=True))
        self._add_hook("", model.register_forward_hook(self._finish_forward(), with_kwargs=True))
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
        """Refused: recomputing the adapted layers in the backward would route them again after the routing
        context of their forward has moved on (Trainer calls this when gradient_checkpointing=True)."""
        raise ValueError(
            "gradient checkpointing is not supported by loramix: the backward would recompute the routed layers "
            "without the routing of their forward; set gradient_checkpointing=False (TRL's SFTConfig turns it on "
            "by default)"
        )

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5

    @property
    def config(self):
        """The base model's (Hugging Face) config, which tools that drive a model (Trainer, TRL, generation) read;
        the adapter's own is `mixlora_config`, as peft's is `peft_config`."""
        return self.base_model.config

    # ---- construction -------------------------------------------------------------------------------------
    def _replace(self, name: str, layer: MixLoraLinear) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name), child, layer)
        self.layers[name] = layer

    def _new_layer(self, name: str, router: Router, owns_router: bool, num_experts: int, slot=None):
        config = self.mixlora_config
        base = self.base_model.get_submodule(name)
        layer = MixLoraLinear(
            base, num_experts, config.expert_rank, config.dropout, router, self.context, owns_router, slot
        )
        self._replace(name, layer)
        if all(router is not known for known in self.context.routers):  # a shared router records once
            self.context.routers.append(router)

    def _wrap_each(self, targets: list[str]) -> None:
        config = self.mixlora_config
        router_class = ROUTERS[config.router]
        device = next(self.base_model.parameters()).device
        shared = None
        if config.router == "task" and config.shared_task_gate:
            shared = router_class(config, 0, config.num_experts, key="task").to(device)
            self.shared_routers["task"] = shared
        for name in targets:
            in_features, _ = linear_features(self.base_model.get_submodule(name))
            router = shared or router_class(config, in_features, config.num_experts, key=name).to(device)
            self._new_layer(name, router, owns_router=shared is None, num_experts=config.num_experts)

    def _add_memory_queues(self) -> None:
        """One memory queue per output size, holding the queues of every layer of that size, so that the
        contrastive loss of all those layers is computed at once."""
        by_size: dict[str, list[MixLoraLinear]] = {}
        for layer in self.layers.values():
            by_size.setdefault(str(layer.out_features), []).append(layer)
        device = next(self.base_model.parameters()).device
        for size, layers in by_size.items():
            queue = ExpertMemoryQueue(
                len(layers), self.mixlora_config.num_experts, self.mixlora_config.memory_queue_size, int(size)
            )
            self.memory_queues[size] = queue.to(device)
            for index, layer in enumerate(layers):
                layer.memory_slot, layer.samples_for_contrast = (size, index), True
                self.context.contrastive_layers.append(layer)

    def _wrap_by_decoder_layer(self, targets: list[str]) -> None:
        groups: dict[str, list[str]] = {}
        for name in targets:
            groups.setdefault(decoder_layer_of(name), []).append(name)
        hidden_size = self.base_model.config.hidden_size
        device = next(self.base_model.parameters()).device
        for block, names in groups.items():
            top_k = self.mixlora_config.top_k
            if top_k > len(names):
                raise ValueError(
                    f"MixLoraConfig.top_k={top_k} is invalid for the 'prompt' router: decoder layer "
                    f"{block!r} has only {len(names)} adapted modules {names}"
                )
            router = ROUTERS["prompt"](self.mixlora_config, hidden_size, len(names), key=block).to(device)
            self.shared_routers[block.replace(".", "_")] = router
            for slot, name in enumerate(names):
                self._new_layer(name, router, owns_router=False, num_experts=1, slot=slot)
            block_module = self.base_model.get_submodule(block)
            router.block_input = block_module.loramix_block_input = BlockInput()
            self.context.block_inputs.append(router.block_input)
            self._add_hook(block, block_module.register_forward_pre_hook(capture_block_input, with_kwargs=True))

    def _add_hook(self, module_name: str, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append((module_name, handle))

    # ---- routing inputs -----------------------------------------------------------------------------------
    # Hooks are closures over the context, not bound methods: `merge_task` deep-copies the base model and
    # must not copy this wrapper along with them.
    def _start_forward(self):
        context = self.context

        def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
            context.new_forward(kwargs.get("attention_mask"))

        return start

    def _finish_forward(self):
        context = self.context

        @torch.no_grad()
        def finish(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            context.collect()
            for stacked in context.stacked_records(context.records, "weights", "indices"):
                stacked.add_to_router_stats()

        return finish

    def _check_task_ids(self, task_ids: Tensor | None) -> None:
        if task_ids is None:
            if self.mixlora_config.router == "task":
                raise ValueError("the 'task' router needs task_ids: a LongTensor of shape (batch,)")
            return
        if not isinstance(task_ids, Tensor) or task_ids.is_floating_point() or task_ids.dim() != 1:
            raise ValueError(f"task_ids must be an integer tensor of shape (batch,), got {task_ids!r}")
        limit = self.mixlora_config.num_tasks
        if limit is not None and task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= limit):
            raise ValueError(f"task ids must lie in [0, {limit}) (num_tasks={limit}), got {task_ids.tolist()}")

    @contextmanager
    def _routing_inputs(self, task_ids: Tensor | None, prompt_mask: Tensor | None, generating: bool = False):
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
    def compile(self, backend: str = "inductor", *, mode: str | None = None) -> bool:
        """Compile each decoder block for training (`loramix.compilation.compile_blocks`); False, with a
        warning, where `backend` cannot compile here. `generate` and evaluation then run the blocks eagerly."""
        return compile_blocks(self, backend, mode=mode)

    accepts_loss_kwargs = False  # for transformers.Trainer: the loss is a mean over the batch's labelled tokens

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        **inputs,
    ):
        """The base model's output; `prompt_mask` marks the tokens sequence-level routing pools over (default:
        every real token).

        With `labels` (-100: not scored) the output holds only `.loss`: `compute_loss`'s training loss, with the
        auxiliary losses and, in training, ReMix's RLOO surrogate over its M routing samples, as
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
        with self._routing_inputs(task_ids, prompt_mask):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **inputs)

    def generate(self, *args, task_ids: Tensor | None = None, **kwargs):
        """`generate` of the base model; prompt-level routes are computed on the prompt and reused."""
        with self._routing_inputs(task_ids, None, generating=True):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def prompt_routing(self, task_ids: Tensor | None = None):
        """Forwards of `base_model` inside share one call's routing, as the steps of `generate` do: routes made
        once per sequence are computed on the first forward (the prompt) and reused by the next ones (which
        continue it through the key-value cache); `select_rows` re-indexes them with the cache's rows."""
        with self._routing_inputs(task_ids, None, generating=True):
            yield

    def select_rows(self, rows: Tensor) -> None:
        """Inside `prompt_routing`: the next forwards continue batch rows `rows` of the previous one."""
        self.context.select_rows(rows)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy on the labelled tokens + weighted auxiliary losses (+ the ReMix RLOO surrogate).

        `batch` holds input_ids, attention_mask, labels (-100 = ignored) and optionally task_ids.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        task_ids = batch.get("task_ids")
        samples = self.mixlora_config.remix_samples if self.mixlora_config.router == "remix" and self.training else 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        repeat_from = self.first_adapted_block() if samples > 1 else None
        if samples > 1:  # the batch repeated M times: M routing samples per sequence
            labels = labels.repeat(samples, 1)
            task_ids = task_ids.repeat(samples) if task_ids is not None else None
            if repeat_from is None:
                inputs = {key: value.repeat(samples, 1) for key, value in inputs.items()}
        prompt_mask = attention_mask.repeat(samples, 1).bool() & (labels == -100)
        # Only the positions that predict a labelled token need the (vocabulary-sized) output projection.
        predicts_label = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
        if self._takes_logits_to_keep:
            inputs["logits_to_keep"] = predicts_label
        if self._takes_use_cache:  # training builds no key-value cache
            inputs["use_cache"] = False
        with self._repeated_from(repeat_from, samples, len(input_ids)) if repeat_from else nullcontext():
            logits = self(task_ids=task_ids, prompt_mask=prompt_mask, **inputs).logits
        if not self._takes_logits_to_keep:
            logits = logits[predicts_label]
        token_losses = F.cross_entropy(logits.float(), labels[:, 1:][predicts_label[:, :-1]], reduction="none")
        rows = predicts_label.nonzero()[:, 0]
        loss = token_losses.sum() / max(len(token_losses), 1)
        parts = {"ce": loss.detach()}
        total = loss + self._auxiliary_losses(parts)
        if samples > 1:
            labelled = torch.zeros(len(labels), device=loss.device).index_add_(0, rows, torch.ones_like(token_losses))
            summed = torch.zeros_like(labelled).index_add(0, rows, token_losses)
            sequence_losses = summed / labelled.clamp_min(1)
            sampled = [r for r in self.context.records if r.routing.sampled]
            log_probs = sum(
                (selection_log_prob(s.tensors["logits"].log_softmax(-1), s.tensors["indices"]) * s.mask).sum((0, 2))
                for s in self.context.stacked_records(sampled, "logits", "indices")
            )
            surrogate = rloo_surrogate(sequence_losses.view(samples, -1), log_probs.view(samples, -1))
            parts["rloo"] = surrogate.detach()
            total = total + surrogate
        self.last_losses = parts
        # the loss holds the graph it needs; the kept records (for routing_stats) must not pin the rest of it
        self.context.records[:] = [record.detached() for record in self.context.records]
        return total

    def first_adapted_block(self) -> str | None:
        """The first numbered decoder block that holds an adapted module, when it is not the first block and
        every adapted module lies in such a block: the blocks before it compute the same for every routing
        sample. None otherwise."""
        blocks = {}
        for name in self.layers:
            match = _DECODER_LAYER.match(name)
            if match is None:
                return None
            prefix, number = match.group(1).rsplit(".", 1)
            blocks[prefix] = min(int(number), blocks.get(prefix, int(number)))
        if len(blocks) != 1:
            return None
        ((prefix, first),) = blocks.items()
        return f"{prefix}.{first}" if first > 0 else None

    @contextmanager
    def _repeated_from(self, block: str, samples: int, rows: int):
        """Forwards of a batch of `rows` rows inside run the frozen blocks before `block` once: from `block` on,
        every block sees its inputs (hidden states, masks, every batch-sized tensor) repeated `samples` times,
        so that M routing samples of a batch share the blocks below the adapters."""
        context = self.context
        prefix, first = block.rsplit(".", 1)
        blocks = list(self.base_model.get_submodule(prefix))[int(first) :]

        def repeat(value):
            if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == rows:
                return value.repeat(samples, *([1] * (value.dim() - 1)))
            if isinstance(value, tuple):
                return tuple(repeat(item) for item in value)
            return value

        def repeat_inputs(module: nn.Module, args: tuple, kwargs: dict):
            context.attention_mask = repeat(context.attention_mask)
            return repeat(args), {key: repeat(value) for key, value in kwargs.items()}

        # prepended: the prompt router's hooks on the same blocks must see the repeated inputs
        handles = [b.register_forward_pre_hook(repeat_inputs, with_kwargs=True, prepend=True) for b in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _auxiliary_losses(self, parts: dict[str, Tensor]) -> Tensor:
        config, records = self.mixlora_config, self.context.records
        total = torch.zeros((), device=next(self.parameters()).device)
        balanced = [r for r in records if r.router.balance_loss and r.routing.indices is not None]
        if config.balance_loss_weight > 0 and balanced:
            loss = sum(
                load_balance_loss(s.tensors["probs"], s.tensors["indices"][..., 0], s.mask).sum()
                for s in self.context.stacked_records(balanced, "probs", "indices")
            )
            parts["balance"] = (loss / len(balanced)).detach()
            total = total + config.balance_loss_weight * loss / len(balanced)
        scored = [r for r in records if r.routing.logits is not None]
        if config.z_loss_weight > 0 and scored:
            stacks = self.context.stacked_records(scored, "logits")
            loss = sum(router_z_loss(s.tensors["logits"], s.mask).sum() for s in stacks) / len(scored)
            parts["z"] = loss.detach()
            total = total + config.z_loss_weight * loss
        samples = [s for s in self.context.expert_samples if len(s.hidden)]
        if config.contrastive_loss_weight > 0 and samples:
            stackable: dict[tuple[str, int], list[ExpertSample]] = {}  # same queue, same number of tokens
            for sample in samples:
                stackable.setdefault((sample.layer.memory_slot[0], len(sample.hidden)), []).append(sample)
            loss = torch.cat([self._contrastive_losses(key[0], group) for key, group in stackable.items()]).mean()
            parts["contrastive"] = loss.detach()
            total = total + config.contrastive_loss_weight * loss
        return total

    def _contrastive_losses(self, name: str, samples: list[ExpertSample]) -> Tensor:
        """(L,) the contrastive loss of each of L layers that share memory queue `name` and sampled as many
        tokens, computed at once; the queries then join the queue."""
        samples = sorted(samples, key=lambda sample: sample.layer.memory_slot[1])
        queue, layers = self.memory_queues[name], [sample.layer.memory_slot[1] for sample in samples]
        hidden = torch.stack([sample.hidden for sample in samples])
        active = torch.stack([sample.active for sample in samples])
        outputs = active_expert_outputs(torch.stack([sample.up for sample in samples]), hidden, active)
        queries = F.normalize(outputs.float(), dim=-1)
        losses = expert_contrastive_loss(queries, active, queue, self.mixlora_config.contrastive_temperature, layers)
        queue.push(queries.flatten(1, 2), active.flatten(1), layers)
        return losses

    # ---- statistics ---------------------------------------------------------------------------------------
    def routers(self) -> dict[str, Router]:
        """Each adapted module's name -> its router (shared routers appear under several names)."""
        return {name: layer.router for name, layer in self.layers.items()}

    def routing_stats(self) -> dict[str, dict]:
        """Per adapted module: {"load": share of routed real tokens per expert, "ess": mean effective support
        size of the routing weights}, accumulated since `reset_routing_stats()`."""
        by_router: dict[int, dict] = {}
        stats = {}
        for name, router in self.routers().items():
            if id(router) not in by_router:
                by_router[id(router)] = router.stats()
            stats[name] = by_router[id(router)]
        return stats

    def reset_routing_stats(self) -> None:
        for router in {id(r): r for r in self.routers().values()}.values():
            router.reset_stats()

    def count_parameters(self) -> dict[str, int]:
        """{"trainable": parameters that train, "active_per_token": adapter parameters one token uses}."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        routers = {id(r): r for r in self.routers().values()}.values()
        active = sum(r.active_parameters() for r in routers)
        for layer in self.layers.values():
            per_expert = layer.rank * (layer.in_features + layer.out_features)
            router = layer.router
            if layer.slot is not None:  # prompt routing: k of the m modules of a decoder layer are active
                active += per_expert * router.top_k / router.num_experts
            elif router.name in ("soft", "task"):
                active += per_expert * layer.num_experts
            else:
                active += per_expert * router.top_k
        return {"trainable": trainable, "active_per_token": round(active)}

    # ---- saving and loading -------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable tensors (experts and routers), named as in the saved file; whole tensors also when the
        model is sharded (then a collective: call it on every rank)."""
        prefix = "base_model."
        return {
            name.removeprefix(prefix): full(p.detach()).contiguous()
            for name, p in self.named_parameters()
            if p.requires_grad
        }

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
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                target = parameters.get("base_model." + name, parameters.get(name))
                target.copy_(tensor)

    def save_pretrained(self, directory: str | Path, is_main_process: bool = True) -> None:
        """Write loramix_config.json and adapter.safetensors (adapter and router tensors only), atomically, and
        a model card (README.md) unless the folder holds one that loramix did not write. A sharded model is
        saved by calling this on every rank; only the one with `is_main_process` writes (as in transformers)."""
        state = {name: tensor.cpu() for name, tensor in self.adapter_state_dict().items()}
        if not is_main_process:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = getattr(getattr(self.base_model, "config", None), "_name_or_path", "") or ""
        atomic_write(
            directory / WEIGHTS_NAME,
            lambda path: save_file(
                state, path, metadata={"format": "pt", "library": "loramix", "base_model": str(base)}
            ),
        )
        atomic_write(directory / CONFIG_NAME, self.mixlora_config.to_json)
        if is_loramix_card(directory / CARD_NAME):  # a README.md of the user's own is kept
            card = model_card(base or None, mixture_method(self.mixlora_config), mixture_details(self.mixlora_config))
            write_card(directory, card)

    def export_peft(self, directory: str | Path, task_id: int) -> Path:
        """Task `task_id`'s update as a standard peft LoRA adapter (task router only)."""
        from loramix.export import export_peft  # export.py imports this module

        return export_peft(self, directory, task_id)

    # ---- merging ------------------------------------------------------------------------------------------
    def task_weights(self, task_id: int) -> dict[str, Tensor]:
        """Each adapted module's expert weights (n,) for a task (task router only)."""
        if self.mixlora_config.router != "task":
            raise ValueError(f"merging by task needs router='task', this model uses {self.mixlora_config.router!r}")
        self._check_task_ids(torch.tensor([task_id]))
        ids = torch.tensor([task_id], device=next(self.parameters()).device)
        with torch.no_grad():
            return {name: layer.router.task_logits(ids)[0].softmax(-1) for name, layer in self.layers.items()}

    @torch.no_grad()
    def merge_task(self, task_id: int) -> nn.Module:
        """A copy of the base model with task `task_id`'s update merged into its weights (task router only).

        The wrapped model is left as it is; the copy runs at the base model's speed.
        """
        weights = self.task_weights(task_id)
        quantized = sorted({type(layer.base_layer).__name__ for layer in self.layers.values() if is_quantized(layer)})
        if quantized:
            raise ValueError(
                f"task {task_id}'s update cannot be merged into quantized weights ({', '.join(quantized)}): load the "
                "base model unquantized, `loramix.load` the adapter onto it and merge that, or keep the adapter "
                "unmerged (or export it with `export_peft`)"
            )
        bases = {id(layer): copy.deepcopy(layer.base_layer) for layer in self.layers.values()}
        memo = dict(bases)
        merged = copy.deepcopy(self.base_model, memo)
        for module_name, handle in self._hooks:  # the copy must not report to this model's routing context
            module = merged.get_submodule(module_name)
            for hooks in (
                module._forward_pre_hooks,
                module._forward_pre_hooks_with_kwargs,
                module._forward_hooks,
                module._forward_hooks_with_kwargs,
            ):
                hooks.pop(handle.id, None)
        for name, layer in self.layers.items():
            copied = bases[id(layer)]
            delta = layer.delta_weight(weights[name])
            copied.weight += (delta.T if isinstance(copied, Conv1D) else delta).to(copied.weight.dtype)
        for name, parameter in merged.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        return merged

    def unload(self) -> nn.Module:
        """Remove every adapter and hook and return the base model as it was before `wrap`."""
        for module_name, handle in self._hooks:
            handle.remove()
            module = self.base_model.get_submodule(module_name)
            if "loramix_block_input" in vars(module):  # a prompt router's decoder block
                del module.loramix_block_input
        self._hooks.clear()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
        self.layers.clear()
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        return self.base_model


def is_quantized(layer: MixLoraLinear) -> bool:
    """Whether an adapted layer's frozen weight is stored quantized (bitsandbytes 8- or 4-bit, integer storage)."""
    return not layer.base_layer.weight.is_floating_point()


def wrap(model: nn.Module, config: MixLoraConfig) -> MixLoraModel:
    """Freeze `model`, replace its target linear layers by mixtures of LoRA experts, and return the wrapper."""
    return MixLoraModel(model, config)


def read_adapter(directory: str | Path) -> tuple[MixLoraConfig, dict[str, Tensor]]:
    """The config and tensors of an adapter folder written by `save_pretrained` (safetensors only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no loramix adapter folder at {directory}")
    config = MixLoraConfig.from_json(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: a loramix adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        return config, load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load(model: nn.Module, directory: str | Path) -> MixLoraModel:
    """Wrap `model` with the adapter saved in `directory` by `save_pretrained` (safetensors only)."""
    config, state = read_adapter(directory)
    wrapped = wrap(model, config)
    try:
        wrapped.load_adapter_state_dict(state, source=str(Path(directory) / WEIGHTS_NAME))
    except ValueError:
        wrapped.unload()
        raise
    return wrapped
