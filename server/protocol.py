"""The wire protocol: pydantic models of every request and response, in the style of vLLM's OpenAI protocol module.

``POST /generate`` takes :class:`GenerateRequest` and answers :class:`GenerateResponse`. The OpenAI-compatible
routes take :class:`CompletionRequest` / :class:`ChatCompletionRequest` (unknown OpenAI fields are ignored, the
SDM fields ``alpha``, ``on_abstain``, ``return_exemplars`` and ``max_attempts`` may be sent as extra body
fields), and every choice carries an ``sdm`` object (:class:`SDMVerification`). Every error is an
:class:`ErrorResponse`.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AbstentionReason",
    "ErrorInfo",
    "ErrorResponse",
    "ChatMessage",
    "GenerateRequest",
    "GenerateResponse",
    "Exemplar",
    "Usage",
    "Timings",
    "SDMVerification",
    "CompletionRequest",
    "CompletionChoice",
    "CompletionResponse",
    "CompletionStreamChoice",
    "CompletionStreamResponse",
    "ChatCompletionRequest",
    "ChatCompletionMessage",
    "ChatCompletionChoice",
    "ChatCompletionResponse",
    "DeltaMessage",
    "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse",
    "StreamOptions",
    "ModelCard",
    "ModelList",
    "ReloadRequest",
    "MAX_STOP_STRINGS",
]

AbstentionReason = Literal["ood", "no_region", "low_similarity", "below_threshold", "predicted_no"]
FinishReason = Literal["stop", "length"]
MAX_STOP_STRINGS = 4


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- shared request pieces ----------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A chat message. ``content`` may be a string or a list of text parts (other part types are refused)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got a {part.type!r} part")
            parts.append(part.text)
        return "".join(parts)


class SelectiveParams(BaseModel):
    """The SDM fields every generation route accepts."""

    alpha: float | None = Field(default=None, description="the alpha whose HIGH-RELIABILITY region decides admission; must be on the bundle's ladder (default: the bundle's alpha)")
    on_abstain: Literal["flag", "withhold"] = Field(default="flag", description="flag: return the text marked as abstained; withhold: return no text")
    return_exemplars: int = Field(default=0, ge=0, description="number of nearest training exemplars to return")
    max_attempts: int = Field(default=1, ge=1, description="resample (temperature > 0) until admitted or this many attempts; the best by (admitted, probability) is returned")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: float | None) -> float | None:
        if value is not None and not (0.5 < value <= 1.0):  # sdm_core's domain of alpha (Algorithm 1 needs > 0.5)
            raise ValueError(f"alpha must be in (0.5, 1], got {value}")
        return value


def _check_max_tokens(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"max_tokens must be >= 1, got {value}")
    return value


def _check_prompts(prompts: list[str]) -> None:
    # The model would answer an empty turn with unrelated text at full generation cost.
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("prompt must not be empty or whitespace; send the instruction to answer")


def _normalize_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


# -- POST /generate -----------------------------------------------------------------------------------------
class GenerateRequest(SelectiveParams):
    """``prompt`` (a user turn, wrapped in the bundle's chat format) or ``messages`` (a chat), exactly one."""

    model_config = ConfigDict(extra="forbid")
    root_param: ClassVar[str] = "prompt"  # the param named by errors of the whole-request check
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = Field(default=None, description="tokens to generate at most (default: the server's --default-max-tokens)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        return _check_max_tokens(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _normalize_stop(value)

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.prompt is not None:
            _check_prompts([self.prompt])
        return self


class Exemplar(BaseModel):
    id: str
    label: int
    label_name: str
    predicted: int
    distance: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_ms: float
    generation_ms: float
    verification_ms: float
    total_ms: float


class SDMVerification(BaseModel):
    """The verification of one output: what ``/generate`` returns next to the text, and each OpenAI choice's ``sdm``."""

    verified: str = Field(description="the force-decoded verification tag word (Yes / No) from the head's prediction")
    probability: float = Field(description="the SDM probability of the verified class")
    probability_lower: float = Field(description="its DKW lower bound")
    admitted: bool
    abstained: bool
    abstention_reason: AbstentionReason | None
    withheld: bool = Field(description="the text was withheld (on_abstain = withhold and the output abstained)")
    alpha: float
    region_alpha: float | None = Field(description="the highest ladder alpha whose region admits the output")
    q: int
    q_prime: float
    d: float
    exemplars: list[Exemplar]
    attempts: int
    timings: Timings


class GenerateResponse(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    text: str | None
    verified: str
    probability: float
    probability_lower: float
    admitted: bool
    abstained: bool
    abstention_reason: AbstentionReason | None
    withheld: bool
    alpha: float
    region_alpha: float | None
    q: int
    q_prime: float
    d: float
    exemplars: list[Exemplar]
    attempts: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


# -- OpenAI-compatible routes --------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _OpenAIRequest(SelectiveParams):
    """Fields both OpenAI routes share. Unsupported OpenAI features are refused with 400 by the server."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 0 (greedy, as the head was calibrated), unlike OpenAI's 1")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _normalize_stop(value)


class CompletionRequest(_OpenAIRequest):
    """``prompt`` is treated as a user turn in the bundle's chat format (the head was calibrated on chat outputs)."""

    prompt: str | list[str]
    max_tokens: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        _check_prompts([value] if isinstance(value, str) else value)
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        return _check_max_tokens(value)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    response_format: dict | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        return _check_max_tokens(value)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason
    sdm: SDMVerification


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: FinishReason
    sdm: SDMVerification


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class CompletionStreamChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    sdm: SDMVerification | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    sdm: SDMVerification | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdm-lm"
    root: str | None = None
    max_model_len: int | None = None
    sdm: dict = Field(default_factory=dict, description="bundle facts: head version, default alpha, alpha ladder, calibration admitted proportion")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str | None = Field(default=None, description="the bundle folder to serve next (default: the configured one, re-read)")
