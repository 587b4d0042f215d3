"""wrap(model, config): a Hugging Face causal LM with mixture-of-LoRA layers; save, load, merge."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramix.compilation import compile_blocks
from loramix.config import MixLoraConfig
from loramix.layer import MixLoraLinear
from loramix.losses import (
    ExpertMemoryQueue,
    expert_contrastive_loss,
    load_balance_loss,
    rloo_surrogate,
    router_z_loss,
    selection_log_prob,
)
from loramix.methods.base import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdaptedModel,
    MethodConfig,
    hooks_removed,
    method_class,
    read_config,
    register_method,
)
from loramix.routing import ROUTERS, Router, RoutingContext
from loramix.routing.base import BlockInput, ExpertSample, capture_block_input
from loramix.targets import decoder_layer_of, find_targets, linear_features, replace_module


@register_method("mixlora", MixLoraConfig)
class MixLoraModel(AdaptedModel):
    """A frozen causal LM whose target linear layers are MixLoraLinear; only experts and routers train."""

    def __init__(self, model: nn.Module, config: MixLoraConfig) -> None:
        if any(isinstance(m, MixLoraLinear) for m in model.modules()):
            raise ValueError("this model is already wrapped by loramix; call unload() first")
        super().__init__(model, config, RoutingContext())
        self.mixlora_config = config
        self.needs_task_ids = config.router == "task"
        self.shared_routers = nn.ModuleDict()
        self.layers: dict[str, MixLoraLinear] = {}
        targets = find_targets(model, config.target_modules, config.layers_to_transform)
        if config.router == "prompt":
            self._wrap_by_decoder_layer(targets)
        else:
            self._wrap_each(targets)
        self.memory_queues = nn.ModuleDict()
        if config.contrastive_loss_weight > 0:
            self._add_memory_queues()
        self._add_hook("", model.register_forward_hook(self._finish_forward(), with_kwargs=True))

    # ---- construction -------------------------------------------------------------------------------------
    def _replace(self, name: str, layer: MixLoraLinear) -> None:
        replace_module(self.base_model, name, layer)
        self.layers[name] = layer

    def _new_layer(self, name: str, router: Router, owns_router: bool, num_experts: int, slot=None):
        config = self.mixlora_config
        base = self.base_model.get_submodule(name)
        added = [count for _, count in config.added_groups()] if config.router == "task" else 0
        layer = MixLoraLinear(
            base, num_experts, config.expert_rank, config.dropout, router, self.context, owns_router, slot, added
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

    # ---- routing statistics -------------------------------------------------------------------------------
    def _finish_forward(self):
        context = self.context

        @torch.compiler.disable  # a compiled decoding step (static cache) leaves the statistics to eager code
        @torch.no_grad()
        def finish(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            context.collect()
            for stacked in context.stacked_records(context.records, "weights", "indices", "probs"):
                stacked.add_to_router_stats()

        return finish

    # ---- the model's API ----------------------------------------------------------------------------------
    def compile(self, backend: str = "inductor", *, mode: str | None = None) -> bool:
        """Compile each decoder block for training (`loramix.compilation.compile_blocks`); False, with a
        warning, where `backend` cannot compile here. `generate` and evaluation then run the blocks eagerly."""
        return compile_blocks(self, backend, mode=mode)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy on the labelled tokens + weighted auxiliary losses (+ the ReMix RLOO surrogate).

        `batch` holds input_ids, attention_mask, labels (-100 = ignored) and optionally task_ids.
        """
        samples = self.mixlora_config.remix_samples if self.mixlora_config.router == "remix" and self.training else 1
        repeat_from = self.first_adapted_block() if samples > 1 else None
        repeated = (lambda: self._repeated_from(repeat_from, samples, len(batch["input_ids"]))) if repeat_from else None
        token_losses, rows = self.labelled_token_losses(batch, samples, repeated)
        loss = token_losses.sum() / max(len(token_losses), 1)
        parts = {"ce": loss.detach()}
        total = loss + self._auxiliary_losses(parts)
        if samples > 1:  # the batch ran M times: M routing samples per sequence
            rows_run = samples * len(batch["input_ids"])
            labelled = torch.zeros(rows_run, device=loss.device).index_add_(0, rows, torch.ones_like(token_losses))
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
        try:
            numbered = [decoder_layer_of(name).rsplit(".", 1) for name in self.layers]
        except ValueError:  # a module outside the numbered blocks
            return None
        blocks = {}
        for prefix, number in numbered:
            blocks[prefix] = min(int(number), blocks.get(prefix, int(number)))
        if len(blocks) != 1:
            return None
        ((prefix, first),) = blocks.items()
        return f"{prefix}.{first}" if first > 0 else None

    def _repeat_call_state(self, repeat) -> None:
        self.context.attention_mask = repeat(self.context.attention_mask)

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
        up = torch.stack([sample.up for sample in samples])
        temperature = self.mixlora_config.contrastive_temperature
        losses, queries = expert_contrastive_loss(hidden, active, up, queue, temperature, layers)
        queue.push(queries.flatten(1, 2), active.flatten(1), layers)
        return losses

    # ---- statistics ---------------------------------------------------------------------------------------
    def routers(self) -> dict[str, Router]:
        """Each adapted module's name -> its router (shared routers appear under several names)."""
        return {name: layer.router for name, layer in self.layers.items()}

    def routing_stats(self) -> dict[str, dict]:
        """Per adapted module: {"load": share of routed real tokens per expert, "ess": mean effective support
        size of the routing weights, "probs_ess": that of the router's distribution over all experts, where it
        has one}, accumulated since `reset_routing_stats()`."""
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
                active += per_expert * (layer.num_experts + layer.added_experts)
            else:
                active += per_expert * router.top_k
        return {"trainable": trainable, "active_per_token": round(active)}

    # ---- merging ------------------------------------------------------------------------------------------
    def task_weights(self, task_id: int) -> dict[str, Tensor]:
        """Each adapted module's expert weights (n (+ added experts),) for a task (task router only)."""
        if self.mixlora_config.router != "task":
            raise ValueError(f"merging by task needs router='task', this model uses {self.mixlora_config.router!r}")
        self._check_task_ids(torch.tensor([task_id]))
        ids = torch.tensor([task_id], device=next(self.parameters()).device)
        with torch.no_grad():
            routers = {name: layer.router for name, layer in self.layers.items()}
            return {name: router.task_probs(ids, router.task_logits(ids))[0] for name, router in routers.items()}

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
                "unmerged (or export it with `loramix.export.export_peft`)"
            )
        bases = {id(layer): copy.deepcopy(layer.base_layer) for layer in self.layers.values()}
        memo = dict(bases)
        # the copy must not report to this model's routing context
        merged = hooks_removed(copy.deepcopy(self.base_model, memo), self._hooks)
        for name, layer in self.layers.items():
            copied = bases[id(layer)]
            delta = layer.delta_weight(weights[name])
            copied.weight += (delta.T if isinstance(copied, Conv1D) else delta).to(copied.weight.dtype)
        for name, parameter in merged.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        return merged

    def _remove_adapter(self) -> None:
        for name in {module_name for module_name, _ in self._hooks}:
            module = self.base_model.get_submodule(name)
            if "loramix_block_input" in vars(module):  # a prompt router's decoder block
                del module.loramix_block_input
        for name, layer in self.layers.items():
            replace_module(self.base_model, name, layer.base_layer)
        self.layers.clear()


def is_quantized(layer: MixLoraLinear) -> bool:
    """Whether an adapted layer's frozen weight is stored quantized (bitsandbytes 8- or 4-bit, integer storage)."""
    return not layer.base_layer.weight.is_floating_point()


def wrap(model: nn.Module, config: MethodConfig) -> AdaptedModel:
    """Freeze `model` and add the adapter that `config` describes (a MixLoraConfig: mixtures of LoRA experts in
    its target linear layers; the config of another method in loramix.methods: that method's)."""
    return method_class(config.method)(model, config)


def read_adapter(directory: str | Path) -> tuple[MethodConfig, dict[str, Tensor]]:
    """The config and tensors of an adapter folder written by `save_pretrained` (safetensors only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no loramix adapter folder at {directory}")
    config = read_config(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: a loramix adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        return config, load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load(model: nn.Module, directory: str | Path) -> AdaptedModel:
    """Wrap `model` with the adapter saved in `directory` by `save_pretrained` (safetensors only)."""
    config, state = read_adapter(directory)
    wrapped = wrap(model, config)
    try:
        wrapped.load_adapter_state_dict(state, source=str(Path(directory) / WEIGHTS_NAME))
    except ValueError:
        wrapped.unload()
        raise
    return wrapped
