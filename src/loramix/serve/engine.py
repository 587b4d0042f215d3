"""Engine: continuous batching for the tenants (tasks) of one backbone, each row of a batch with its own adapter."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from collections.abc import Sequence as Sequence_
from pathlib import Path

import torch
from jinja2 import TemplateError
from torch import nn

from loramix.methods import AdaptedModel, backbone
from loramix.model import MixLoraModel
from loramix.models import eos_token_ids
from loramix.serve.adapters import LORA_RUNNER, AdapterSet, ServedAdapter
from loramix.serve.batch import RunningBatch
from loramix.serve.decoding import (
    MAX_TOP_LOGPROBS,
    Completion,
    DoneListener,
    ErrorListener,
    GenerationRequest,
    Sequence,
    TextListener,
)
from loramix.serve.rows import TaskRows
from loramix.serve.runners import AdaptedRunner, PlainRunner, Runner, TaskRowsRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1024
CHARACTERS_PER_TOKEN = 100  # a text longer than this many characters per allowed token is refused untokenized
MAX_STOP_LENGTH = 256


class RequestError(ValueError):
    """A request that cannot be served; `status` is the HTTP status to answer with (OpenAI error fields)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Engine:
    """Decodes requests whose rows may belong to different tasks with continuous (iteration-level) batching:
    `admit` processes new prompts and adds them to the running batch, `step` runs one decoding step for every
    running row, and a row leaves as soon as it ends (`generate` does both until all requests are done).

    Which running batch (runner) a request joins depends on the adapter:
    - task router: a task with a merged copy (`merged_tasks`) decodes in a batch of its own on that copy, at the
      base model's speed; every other task shares one batch with per-row task adapters (`TaskRows`).
    - other loramix routers and methods: one batch on the model, with each row's task id; what is computed once
      per prompt (routes of `prompt` and sequence-level routers, PEDRO's vectors, IAPT's soft tokens) is computed
      on the prompt and travels with the row (a RowState) for every decoding step.
    - a plain or peft model: one batch on the model as it is; every task shares it.

    `tasks` names the tenants: task id = position (as in a run's recipe). `system_prompt` is put before chats
    that bring no system message (a run's recipe.system_prompt: the format it was trained in; None leaves the
    chat template's default). The engine owns the model (the per-row path swaps its layers during a forward);
    call `admit` and `step` from one thread.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        tasks: Sequence_[str],
        *,
        max_new_tokens: int = 256,
        max_prompt_tokens: int | None = None,
        merged_tasks: int = 0,
        system_prompt: str | None = None,
        adapters: AdapterSet | None = None,
    ) -> None:
        if (not tasks and adapters is None) or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must name each tenant once, got {list(tasks)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.system_prompt = system_prompt
        self.device = next(model.parameters()).device
        self.vocab_size = backbone(model).get_input_embeddings().num_embeddings
        self.eos_token_ids = eos_token_ids(backbone(model), tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens or self._default_prompt_limit()
        if max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} and max_prompt_tokens={self.max_prompt_tokens} must be >= 1 "
                "(by default the prompt gets the model's context less max_new_tokens)"
            )
        self.rows: TaskRows | None = None
        self.merged: dict[int, nn.Module] = {}
        if isinstance(model, MixLoraModel) and model.mixlora_config.router == "task":
            if len(self.tasks) > model.mixlora_config.num_tasks:
                raise ValueError(
                    f"{len(self.tasks)} tasks named; the adapter has num_tasks={model.mixlora_config.num_tasks}"
                )
            self.rows = TaskRows(model)
            if not 0 <= merged_tasks <= len(self.tasks):
                raise ValueError(f"merged_tasks={merged_tasks} must lie in [0, {len(self.tasks)}] (the tasks)")
            self.merged = {task: model.merge_task(task).eval() for task in range(merged_tasks)}
        elif merged_tasks:
            raise ValueError(f"merged_tasks={merged_tasks}: only a loramix adapter with router='task' merges by task")
        self.config = backbone(model).config
        self.runners: dict[Hashable, Runner] = {"model": self._model_runner()}
        self.runners |= {("merged", task): PlainRunner(copy) for task, copy in self.merged.items()}
        self.adapters = adapters
        if adapters is not None:
            self.runners[LORA_RUNNER] = adapters.lora
            for served in adapters.served.values():
                self._add_runner(served)
        self.batches = {key: RunningBatch(runner) for key, runner in self.runners.items()}
        self._retiring: set[Hashable] = set()  # runners of unloaded adapters, dropped once their rows are done
        self._lock = threading.Lock()

    def _model_runner(self) -> Runner:
        if self.rows is not None:
            return TaskRowsRunner(self.rows)
        if isinstance(self.model, AdaptedModel):
            return AdaptedRunner(self.model)
        return PlainRunner(backbone(self.model))

    def _default_prompt_limit(self) -> int:
        config = backbone(self.model).config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if context is None:
            return DEFAULT_MAX_PROMPT_TOKENS
        return min(DEFAULT_MAX_PROMPT_TOKENS, context - self.max_new_tokens)

    # ---- requests -------------------------------------------------------------------------------------------
    @property
    def model_ids(self) -> list[str]:
        """Every model id a request may name: the run's tasks, then the adapters' (NAME or NAME/TASK)."""
        return self.tasks + (self.adapters.model_ids() if self.adapters is not None else [])

    def task_id(self, name: str) -> int:
        """The id of a task of the run (tenant) by name; RequestError (404) if the run has no such task."""
        if name not in self.tasks:
            raise self._not_found(name)
        return self.tasks.index(name)

    def _not_found(self, name: str) -> RequestError:
        return RequestError(
            f"The model {name!r} does not exist; this server has {self.model_ids}",
            param="model",
            status=404,
            code="model_not_found",
        )

    def _resolve(self, model: str) -> tuple[Hashable | None, int]:
        """(the runner of requests to `model`, None for the run's own; their task id) or a RequestError."""
        if model in self.tasks or self.adapters is None:
            return None, self.task_id(model)
        try:
            found = self.adapters.resolve(model)
        except ValueError as error:
            raise RequestError(str(error), param="model") from None
        if found is None or found[0] not in self.adapters.served:
            raise self._not_found(model)
        name, task = found
        served = self.adapters.served[name]
        self.adapters.touch(name)
        return served.runner, served.task_ids[task or 0]

    # ---- adapters by name ---------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> list[str]:
        """Serve the adapter in folder `path` as `name` (a peft LoRA or a loramix run folder), beside the others;
        returns its model ids. RequestError (400) names what is wrong; the folder is read before taking the lock."""
        adapters = self._adapter_set()
        if name in adapters.served:
            raise RequestError(f"an adapter named {name!r} is already loaded: unload it first", param="lora_name")
        try:
            served, runner = adapters.prepare(name, path)
        except (ValueError, FileNotFoundError) as error:
            raise RequestError(str(error), param="lora_path") from None
        with self._lock:
            if runner is not None:
                self.runners[served.runner] = runner
                self.batches[served.runner] = RunningBatch(runner)
            for evicted in adapters.add(served):
                self._retire(evicted)
        return served.model_ids()

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`: new requests to it get 404; rows decoding with it finish first."""
        adapters = self._adapter_set()
        if name not in adapters.known:
            raise RequestError(f"no adapter named {name!r} is loaded", param="lora_name", status=404)
        with self._lock:
            served = adapters.forget(name)
            if served is not None:
                self._retire(served)

    def ensure_resident(self, model: str) -> None:
        """Load again the adapter `model` names if it was dropped to keep --max-adapters resident (slow: call it
        off the event loop); a no-op for anything else."""
        if self.adapters is None or model in self.tasks:
            return
        name = model.partition("/")[0]
        path = self.adapters.known.get(name)
        if path is not None and name not in self.adapters.served:
            self.load_adapter(name, path)

    def _still_served(self, key: Hashable, request: GenerationRequest) -> bool:
        if key not in self.runners:
            return False
        return key != LORA_RUNNER or request.task in self.adapters.lora.tenants

    def _adapter_set(self) -> AdapterSet:
        if self.adapters is None:
            raise RequestError("this server loads no adapters by name (start it with --adapter)", status=400)
        return self.adapters

    def _add_runner(self, served: ServedAdapter) -> None:
        if served.runner != LORA_RUNNER:
            self.runners[served.runner] = AdaptedRunner(served.model)

    def _retire(self, served: ServedAdapter) -> None:
        if served.runner != LORA_RUNNER:
            self._retiring.add(served.runner)

    def _drop_retired(self) -> None:
        for key in [key for key in self._retiring if not self.batches[key].sequences]:
            self._retiring.discard(key)
            del self.runners[key], self.batches[key]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (with the tokenizer's special tokens, as a plain call adds)."""
        self._check_size(len(text), "prompt")
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the tokenizer's chat template, ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        self._check_size(sum(len(message["content"]) for message in messages), "messages")
        if self.system_prompt is not None and not any(message["role"] == "system" for message in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            raise RequestError(f"the chat template rejected the messages: {error}", param="messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_size(self, characters: int, param: str) -> None:
        """Refuse a text far too long for the prompt limit before spending time on tokenizing it."""
        if characters > CHARACTERS_PER_TOKEN * self.max_prompt_tokens:
            raise RequestError(
                f"This server's maximum prompt length is {self.max_prompt_tokens} tokens; "
                f"your prompt has {characters} characters",
                param=param,
                code="context_length_exceeded",
            )

    def request(
        self,
        model: str,
        prompt_ids: list[int],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence_[str] = (),
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_param: str = "prompt",
    ) -> GenerationRequest:
        """A validated GenerationRequest for `model` (a task of the run, or an adapter's model id); RequestError
        names the field at fault."""
        runner, task = self._resolve(model)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param=prompt_param)
        if not all(0 <= token < self.vocab_size for token in prompt_ids):
            raise RequestError(f"the prompt has token ids outside [0, {self.vocab_size})", param=prompt_param)
        if len(prompt_ids) > self.max_prompt_tokens:
            raise RequestError(
                f"This server's maximum prompt length is {self.max_prompt_tokens} tokens; "
                f"your prompt has {len(prompt_ids)} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = self.max_new_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise RequestError(f"max_tokens={max_tokens} must lie in [1, {self.max_new_tokens}]", param="max_tokens")
        if temperature < 0:
            raise RequestError(f"temperature={temperature} must be >= 0", param="temperature")
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p={top_p} must lie in (0, 1]", param="top_p")
        if seed is not None and not 0 <= seed < 2**63:
            raise RequestError(f"seed={seed} must lie in [0, 2**63)", param="seed")
        if any(len(text) > MAX_STOP_LENGTH for text in stop):
            raise RequestError(f"stop strings may have at most {MAX_STOP_LENGTH} characters", param="stop")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top logprobs={logprobs} must lie in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        return GenerationRequest(
            task, list(prompt_ids), max_tokens, temperature, top_p, tuple(stop), seed, logprobs, runner=runner
        )

    # ---- generation -----------------------------------------------------------------------------------------
    def sequence(
        self,
        request: GenerationRequest,
        on_text: TextListener | None = None,
        on_done: DoneListener | None = None,
        on_error: ErrorListener | None = None,
    ) -> Sequence:
        """A Sequence for `request`, to `admit`; its listeners receive its text, completion or failure."""
        return Sequence(request, self.tokenizer, self.eos_token_ids, self.device, on_text, on_done, on_error)

    @property
    def running(self) -> int:
        """How many sequences are decoding."""
        return sum(len(batch) for batch in self.batches.values())

    def admit(self, sequences: Sequence_[Sequence]) -> None:
        """Process the prompts of new sequences (one forward per runner, new prompts only) and let those that go
        on join their runner's running batch, to decode in its next `step`. If a forward fails, each of its
        sequences is tried alone, so that only a request at fault fails."""
        groups: dict[Hashable, list[Sequence]] = {}
        for sequence in sequences:
            groups.setdefault(self._runner_key(sequence.request), []).append(sequence)
        for key, group in groups.items():
            gone = [sequence for sequence in group if not self._still_served(key, sequence.request)]
            for sequence in gone:  # its adapter was unloaded (or dropped for --max-adapters) while it waited
                sequence.fail(RequestError("the adapter was unloaded before this request started: retry", status=503))
            group = [sequence for sequence in group if sequence not in gone]
            if not group:
                continue
            try:
                with self._lock, torch.inference_mode():
                    new = RunningBatch.prefill(self.runners[key], group, self.pad_token_id, self.device, self.config)
            except Exception as error:
                if len(group) > 1:
                    for sequence in group:
                        self.admit([sequence])
                    continue
                logger.exception("a prompt of %d tokens failed", len(group[0].request.prompt_ids))
                group[0].fail(error)
                continue
            self.batches[key].join(new)

    def step(self) -> None:
        """One decoding step of every running batch (one forward each); finished and cancelled rows leave. A
        failed forward fails the rows of its batch."""
        for batch in list(self.batches.values()):
            if not batch.sequences:
                continue
            try:
                with self._lock, torch.inference_mode():
                    batch.step()
            except Exception as error:
                logger.exception("a decoding step of %d rows failed", len(batch))
                batch.fail(error)
        if self._retiring:
            with self._lock:
                self._drop_retired()

    def generate(
        self,
        requests: Sequence_[GenerationRequest],
        on_text: Callable[[int, str], None] | None = None,
        on_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Generate for all requests, admitted together, until every one has finished (raises the first error).

        `on_text(row, piece)` receives each row's text as it becomes final; `on_done(row, completion)` a row's
        completion as soon as it ends, before the rest of the batch.
        """
        errors: list[Exception] = []
        sequences = [
            self.sequence(
                request,
                on_text and (lambda piece, _, row=row: piece and on_text(row, piece)),
                on_done and (lambda completion, row=row: on_done(row, completion)),
                errors.append,
            )
            for row, request in enumerate(requests)
        ]
        self.admit(sequences)
        while self.running:
            self.step()
        if errors:
            raise errors[0]
        return [sequence.completion for sequence in sequences]

    def _runner_key(self, request: GenerationRequest) -> Hashable:
        """Which runner decodes a request: its adapter's, or for the run's tasks their merged copy if there is one,
        else the run's model."""
        if request.runner is not None:
            return request.runner
        return ("merged", request.task) if request.task in self.merged else "model"
