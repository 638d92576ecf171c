"""The wire protocol: pydantic models of every request and response, in the style of vLLM's OpenAI protocol module.

``POST /generate`` takes :class:`GenerateRequest` and answers :class:`GenerateResponse`. The OpenAI-compatible
routes take :class:`CompletionRequest` / :class:`ChatCompletionRequest` (unknown OpenAI fields are ignored, the
SDM fields ``alpha``, ``on_abstain``, ``return_exemplars`` and ``max_attempts`` may be sent as extra body
fields), and every choice carries an ``sdm`` object (:class:`SDMVerification`). Every error is an
:class:`ErrorResponse`. Each generation request turns itself into the pipeline's
:class:`~server.pipeline.VerificationDraft` (``to_verification``), applying this server's defaults.

Size: the whole wire contract in one file, as vLLM's protocol module: a client author reads every request,
response and stream chunk here, and the OpenAPI schema is generated from it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from sdm_core.math import check_alpha
from server.errors import invalid_request
from server.pipeline import VerificationDraft

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
    "chat_prompt",
]

AbstentionReason = Literal["ood", "no_region", "low_similarity", "below_threshold", "predicted_no"]
FinishReason = Literal["stop", "length"]
MAX_STOP_STRINGS = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BUNDLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Request models are strict: "yes" is not a boolean, true is not 1, "4" is not a number (an int is still a float),
# and NaN / infinity are not numbers.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def _valid_unicode(value: str) -> str:
    # JSON may carry a lone UTF-16 surrogate (\ud800); no tokenizer can encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x}) at character {exc.start}; send valid "
            "Unicode text"
        ) from None
    return value


def _prompt_text(value: str) -> str:
    # The model would answer an empty turn with unrelated text at full generation cost.
    if not value.strip():
        raise ValueError("must not be empty or whitespace; send the instruction to answer")
    return _valid_unicode(value)


Text = Annotated[str, AfterValidator(_valid_unicode)]
PromptText = Annotated[
    str, AfterValidator(_prompt_text), WithJsonSchema({"type": "string", "minLength": 1, "pattern": r"\S"})
]
StopText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- shared request pieces ----------------------------------------------------------------------------------
_NON_BLANK = {"type": "string", "minLength": 1, "pattern": r"\S"}
_PARTS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}, "text": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    },
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    """A chat message. ``content`` may be a string or a list of text parts (other part types are refused); it must
    hold some text."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"required": ["role", "content"]})
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[Text, WithJsonSchema(_NON_BLANK)]
        | Annotated[list[ContentPart], WithJsonSchema(_PARTS)]
        | SkipJsonSchema[None]
    ) = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart]:
        if isinstance(value, list) and any(part.type != "text" or part.text is None for part in value):
            return value  # refused by the server as unsupported content (named there)
        text = value if isinstance(value, str) else "".join(part.text or "" for part in value or [])
        if not text.strip():
            raise ValueError("must not be empty or whitespace; send the text of the turn")
        return value

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


def chat_prompt(messages: Sequence[ChatMessage]) -> list[dict]:
    """The chat as the pipeline takes it (``developer`` turns as ``system``); a 400 naming a non-text part."""
    out = []
    for i, m in enumerate(messages):
        try:
            content = m.text()
        except ValueError as exc:
            raise invalid_request(
                f"messages.{i}.content: {exc}", f"messages.{i}.content", "unsupported_content"
            ) from None
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


class SelectiveParams(BaseModel):
    """The SDM fields every generation route accepts."""

    model_config = _STRICT
    alpha: float | None = Field(
        default=None,
        json_schema_extra={"exclusiveMinimum": 0.5, "maximum": 1.0},
        description="the alpha whose HIGH-RELIABILITY region decides admission; must be on the bundle's ladder "
        "(default: the bundle's alpha)",
    )
    on_abstain: Literal["flag", "withhold"] = Field(
        default="flag", description="flag: return the text marked as abstained; withhold: return no text"
    )
    return_exemplars: int = Field(default=0, ge=0, description="number of nearest training exemplars to return")
    max_attempts: int = Field(
        default=1,
        ge=1,
        description="resample (temperature > 0) until admitted or this many attempts; the best by (admitted, "
        "probability) is returned",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: float | None) -> float | None:
        return None if value is None else check_alpha(value, "alpha")

    def _draft(self, **generation) -> VerificationDraft:
        """The draft of ``generation``'s fields (prompt, tokens, sampling, stop) with this request's SDM fields."""
        return VerificationDraft(
            **generation,
            alpha=self.alpha,
            on_abstain=self.on_abstain,
            return_exemplars=int(self.return_exemplars),
            max_attempts=int(self.max_attempts),
        )


def _normalize_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


# -- POST /generate -----------------------------------------------------------------------------------------
class GenerateRequest(SelectiveParams):
    """``prompt`` (a user turn, wrapped in the bundle's chat format) or ``messages`` (a chat), exactly one."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    )
    root_param: ClassVar[str] = "prompt"  # the param named by errors of the whole-request check
    model: str | None = Field(
        default=None, description="the served model to answer (GET /v1/models); default: the server's default model"
    )
    prompt: PromptText | SkipJsonSchema[None] = None
    messages: list[ChatMessage] | SkipJsonSchema[None] = Field(default=None, json_schema_extra={"minItems": 1})
    max_tokens: MaxTokens | None = Field(
        default=None, description="tokens to generate at most (default: the server's --default-max-tokens)"
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Stop | None = None

    @field_validator("prompt", "messages", mode="before")
    @classmethod
    def _not_null(cls, value, info):
        if value is None:  # the schema has no null here: leave the field out instead
            raise ValueError(
                f"must not be null; leave '{info.field_name}' out to send "
                f"{'messages' if info.field_name == 'prompt' else 'a prompt'}"
            )
        return value

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must not be empty; send at least one message")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _normalize_stop(value)

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def to_verification(self, default_max_tokens: int) -> VerificationDraft:
        prompt, param = (
            (self.prompt, "prompt") if self.prompt is not None else (chat_prompt(self.messages or []), "messages")
        )
        return self._draft(
            prompt=prompt,
            prompt_param=param,
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


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


class _Verdict(BaseModel):
    """The verification fields that ``/generate`` returns next to the text and each OpenAI choice's ``sdm`` holds."""

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


class SDMVerification(_Verdict):
    """The verification of one output: what ``/generate`` returns next to the text, and each OpenAI choice's ``sdm``."""

    timings: Timings


class _GenerationHead(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    text: str | None


class GenerateResponse(_Verdict, _GenerationHead):
    # POST /generate's answer: the text, its verification (SDMVerification's fields, flat), how it finished, usage
    # and timings, in that order (pydantic takes the bases' fields last base first).
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


# -- OpenAI-compatible routes --------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _OpenAIRequest(SelectiveParams):
    """Fields both OpenAI routes share. Unsupported OpenAI features are refused with 400 by the server."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str | None = None
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="default 0 (greedy, as the head was calibrated), unlike OpenAI's 1"
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, json_schema_extra={"minimum": 1, "maximum": 1}, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _normalize_stop(value)

    def _openai_draft(
        self, prompt: str | list[dict], prompt_param: str, max_tokens: int, tokens_param: str
    ) -> VerificationDraft:
        # temperature defaults to 0 (greedy, as the head was calibrated), not OpenAI's 1
        return self._draft(
            prompt=prompt,
            prompt_param=prompt_param,
            max_tokens=max_tokens,
            tokens_param=tokens_param,
            temperature=0.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


class CompletionRequest(_OpenAIRequest):
    """``prompt`` is treated as a user turn in the bundle's chat format (the head was calibrated on chat outputs)."""

    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a string, or a list holding one string)"
    )
    max_tokens: MaxTokens | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def to_verification(self, default_max_tokens: int) -> VerificationDraft:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid_request(
                    "prompt: send one prompt per request (a string, or a list holding one string)",
                    "prompt",
                    "unsupported_parameter",
                )
            prompt = prompt[0]
        return self._openai_draft(
            prompt, "prompt", default_max_tokens if self.max_tokens is None else self.max_tokens, "max_tokens"
        )


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    response_format: dict | None = None

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must not be empty; send at least one message")
        return value

    def to_verification(self, default_max_tokens: int) -> VerificationDraft:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens`` and is the one errors name."""
        if self.max_completion_tokens is not None:
            tokens, param = self.max_completion_tokens, "max_completion_tokens"
        else:
            tokens, param = (default_max_tokens if self.max_tokens is None else self.max_tokens), "max_tokens"
        return self._openai_draft(chat_prompt(self.messages), "messages", tokens, param)


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
    refusal: str | None = Field(
        default=None,
        description="why there is no content: the abstention, when the text was withheld (on_abstain = withhold)",
    )


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
    refusal: str | None = None


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
    sdm: dict = Field(
        default_factory=dict,
        description="bundle facts: head version, default alpha, alpha ladder, calibration admitted proportion",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(
        default=None,
        description="the served model to reload (GET /v1/models); default: the server's default model. The other "
        "served models keep serving",
    )
    bundle: str | None = Field(
        default=None,
        json_schema_extra={"pattern": BUNDLE_NAME_PATTERN},
        description="the name of a bundle folder under the server's --bundles-root to serve next "
        "(default: the served bundle, re-read); a name, not a path",
    )
