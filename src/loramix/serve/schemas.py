"""Request bodies of the OpenAI-compatible endpoints. Types are strict ("5" is not an int); unknown fields are
ignored, as OpenAI clients send some that do not apply (user, ...)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loramix.serve.decoding import MAX_TOP_LOGPROBS


class Sampling(BaseModel):
    """Fields shared by completions and chat completions. `model` names the task (tenant)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy (the default)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    n: Literal[1] = 1
    seed: int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(Sampling):
    """POST /v1/completions. `logprobs`: report that many most likely tokens beside each generated one."""

    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Sampling):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body): a peft LoRA or loramix run folder, served as `lora_name`."""

    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(min_length=1)
