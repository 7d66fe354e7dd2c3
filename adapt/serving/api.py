"""The OpenAI request bodies the server accepts, checked into what the decoder needs.

Every check runs before anything is queued or allocated: types (strict: "5" is not 5, true is not 1), the
model name, `max_tokens` against the context, the prompt's token count against the context, the sampling
settings (the same `SamplingConfig` checks as `adapt sample`). A failure is an `ApiError`, sent as
OpenAI's `{"error": {"message", "type", "param", "code"}}` with its 4xx status.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError, first_line
from adapt.sampling.canvas import encode, encode_prompt
from adapt.sampling.config import CacheMode, Confidence, SamplingConfig, StepSchedule, Strategy
from adapt.sampling.engine import resolve_cache

MAX_STOPS = 4  # as OpenAI
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    """Fields common to both routes: OpenAI's, then the diffusion settings (default: the checkpoint's)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # the diffusion settings, named as SamplingConfig's fields and `adapt sample`'s options
    strategy: Strategy | None = None
    steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    cache: CacheMode | None = None
    cache_refresh: int | None = None
    step_schedule: StepSchedule | None = None
    top_k: int | None = None
    confidence: Confidence | None = None
    entropy_bound: float | None = None
    draft_length: int | None = None
    mask_block: int | None = None
    candidates: int | None = None
    redraft: bool | None = None
    eos_penalty: float | None = None
    eos_confidence_cap: float | None = None


DIFFUSION_FIELDS = (
    "strategy",
    "steps",
    "block_length",
    "threshold",
    "cache",
    "cache_refresh",
    "step_schedule",
    "top_k",
    "confidence",
    "entropy_bound",
    "draft_length",
    "mask_block",
    "candidates",
    "redraft",
    "eos_penalty",
    "eos_confidence_cap",
)


class CompletionRequest(_Request):
    prompt: str | list[str]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None


FIELDS = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(Message.model_fields)


def _zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _off(v: Any) -> bool:
    return v is None or v is False or (type(v) is int and v == 0)


NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logprobs": _off,
    "top_logprobs": _zero,
    "echo": _off,
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "logit_bias": lambda v: v is None or v == {},
}
"""OpenAI fields the server does not offer, accepted at the value that asks for nothing (some clients
always send them); any other value is refused, never ignored."""


def parse(kind: type[_Request], data: Any) -> Any:
    """`data` (decoded JSON) as a `kind` request; the first problem as an ApiError naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, neutral in NEUTRAL.items():
        if name in data and not neutral(value := data.pop(name)):
            raise ApiError(400, f"{name} {json.dumps(value)[:40]} is not supported by this server", name)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        unknown = err["type"] == "extra_forbidden"
        param = _param(err["loc"], known=FIELDS | {err["loc"][-1]} if unknown else FIELDS)
        if unknown:
            raise ApiError(400, f"unknown or unsupported field {param!r}", param) from None
        raise ApiError(400, f"{param}: {err['msg']}", param) from None


def _param(loc: tuple[Any, ...], known: set[Any]) -> str:
    """`messages[0].content` from pydantic's location, less the union member names it appends."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in known:
            out += f".{part}" if out else part
        else:
            break
    return out


@dataclass(frozen=True)
class Served:
    """The checkpoint being served: what request checks need to know of it."""

    name: str
    tokenizer: Any
    settings: DiffusionSettings
    context: int
    """Longest sequence the model takes: prompt + generated tokens."""
    default_max_tokens: int
    """`max_tokens` of a request that gives none (cut to the room the prompt leaves)."""
    max_batch: int
    """At most this many prompts per request (each is a row of a batch)."""


@dataclass(frozen=True)
class Plan:
    """A checked request: one prompt (token ids) per choice, and how to decode them."""

    prompts: list[list[int]]
    config: SamplingConfig
    stream: bool
    include_usage: bool


def check_model(name: str, served: Served) -> None:
    if name != served.name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {served.name!r}",
            "model",
            "model_not_found",
        )


def plan_completion(req: CompletionRequest, served: Served) -> Plan:
    check_model(req.model, served)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not 1 <= len(texts) <= served.max_batch:
        raise ApiError(400, f"prompt: give 1 to {served.max_batch} prompts, not {len(texts)}", "prompt")
    _check_options(req)
    prompts = [_tokens(served, t, "prompt", chat=False) for t in texts]
    return _plan(req, req.max_tokens, prompts, "prompt", served)


def plan_chat(req: ChatRequest, served: Served) -> Plan:
    check_model(req.model, served)
    if not req.messages:
        raise ApiError(400, "messages: give at least one message", "messages")
    _check_options(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    ids = chat_tokens(served, req.messages)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _plan(req, limit, [ids], "messages", served)


def chat_tokens(served: Served, messages: list[Message]) -> list[int]:
    """The conversation through the checkpoint's chat template, ready for the assistant's turn."""
    from jinja2 import TemplateError

    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, "this checkpoint's tokenizer has no chat template; use /v1/completions", "messages"
        )
    turns = [{"role": m.role, "content": _content(m)} for m in messages]
    mask = served.settings.mask_token
    if any(mask in t["content"] for t in turns):
        raise ApiError(400, f"messages: the mask token {mask} cannot be served", "messages")
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ApiError(
            400, f"the chat template cannot render these messages: {first_line(e)}", "messages"
        ) from e
    if not isinstance(text, str):
        raise ApiError(400, "the chat template did not render text", "messages")
    return encode(tokenizer, text)  # as `adapt sample --chat` encodes its one user turn


def _content(m: Message) -> str:
    if m.content is None:
        return ""
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def _tokens(served: Served, text: str, param: str, chat: bool) -> list[int]:
    mask = served.settings.mask_token
    if mask in text:
        raise ApiError(
            400,
            f"{param}: the mask token {mask} cannot be served (to fill masks: adapt sample --infill)",
            param,
        )
    return encode_prompt(served.tokenizer, text, chat)


def _check_options(req: _Request) -> None:
    if req.n is not None and req.n != 1:
        raise ApiError(400, f"n: this server returns one choice per prompt (n=1), not {req.n}", "n")
    if req.temperature is not None and req.temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, not {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], not {req.top_p}", "top_p")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be in [0, 2**63 - 1], not {req.seed}", "seed")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, not {req.max_tokens}", "max_tokens")
    limit = getattr(req, "max_completion_tokens", None)
    if limit is not None and limit < 1:
        raise ApiError(400, f"max_completion_tokens must be >= 1, not {limit}", "max_completion_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", "stop")


def _plan(
    req: _Request, max_tokens: int | None, prompts: list[list[int]], param: str, served: Served
) -> Plan:
    """The sampling settings of a request, and its prompts checked against the model's context."""
    settings, tokenizer = served.settings, served.tokenizer
    bos = tokenizer.bos_token_id
    for i, ids in enumerate(prompts):
        if not ids and settings.shift:  # with shift the first token must be given: BOS, as the sampler does
            if bos is None:
                raise ApiError(400, f"{param}: empty, and the tokenizer has no BOS to start from", param)
            prompts[i] = [bos]
    longest = max(len(p) for p in prompts)
    room = served.context - longest
    limit_param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is not None and max_tokens >= served.context:
        raise ApiError(
            400,
            f"{limit_param} {max_tokens} is beyond the model's context of {served.context} tokens",
            limit_param,
            "context_length_exceeded",
        )
    if room < 1:
        raise ApiError(
            400,
            f"{param} is {longest} tokens: the model's context of {served.context} leaves no room "
            "to generate",
            param,
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise ApiError(
            400,
            f"{param} ({longest} tokens) plus {limit_param} ({max_tokens}) is more than the model's "
            f"context of {served.context} tokens",
            param,
            "context_length_exceeded",
        )
    gen_length = max_tokens if max_tokens is not None else min(served.default_max_tokens, room)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    given = {f: getattr(req, f) for f in DIFFUSION_FIELDS if getattr(req, f) is not None}
    fields: dict[str, Any] = {
        "gen_length": gen_length,
        "stop": tuple(stops),
        "seed": req.seed if req.seed is not None else secrets.randbelow(2**31),
        **({"temperature": req.temperature} if req.temperature is not None else {}),
        **({"top_p": req.top_p} if req.top_p is not None else {}),
        **given,
    }
    try:
        config = resolve_cache(SamplingConfig(**fields), settings)
    except AdaptError as e:
        raise ApiError(400, as_fields(first_line(e))) from None
    include = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    return Plan(prompts, config, req.stream, include)


def as_fields(message: str) -> str:
    """A sampler's message in the request's words: `--block-length` is block_length, gen_length max_tokens."""
    message = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)
    return re.sub(r"\bgen_length\b", "max_tokens", message)


def batch_key(config: SamplingConfig) -> tuple[Any, ...] | None:
    """Requests with equal keys may share a batch (each row then gets what it gets alone); None: decode
    alone, since its random draws depend on the batch (temperature > 0, the `random` strategy)."""
    if config.temperature > 0 or config.strategy == "random":
        return None
    return dataclasses.astuple(dataclasses.replace(config, seed=0))
