"""The request bodies of the HTTP API, typed and checked (unknown fields are errors, so a typo is never silently
ignored). OpenAI's fields keep their names and meaning; the diffusion sampler's knobs are extra body fields (the
`openai` client's `extra_body`). Fields whose meaning this sampler cannot give (`temperature`, `top_p`, penalties,
`logprobs`, `stop`, forced tool choice) are refused when set, with what to use instead."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgserve.model.settings import MAX_SEED

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Positive = Annotated[int, Field(ge=1, le=2**32 - 1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
KNOBS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
UNSUPPORTED = {  # field -> why, for a value other than null (or the neutral value given in NEUTRAL)
    "temperature": "the diffusion sampler's temperature is a schedule over the denoising steps: set t_min and t_max",
    "top_p": "the diffusion sampler has no nucleus sampling: set entropy_bound (how much entropy a step accepts)",
    "frequency_penalty": "penalties are not applied by the diffusion sampler",
    "presence_penalty": "penalties are not applied by the diffusion sampler",
    "logit_bias": "logit bias is not applied by the diffusion sampler",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "stop": "stop sequences are not applied: the model ends its turn itself; use max_tokens to bound the output",
    "response_format": "structured output is not constrained: describe the format in the prompt",
    "suffix": "insertion (suffix) is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of is not supported",
}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False, "best_of": 1,
           "response_format": {"type": "text"}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Request(BaseModel):
    """Fields both routes take."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Annotated[str, Field(min_length=1, max_length=256)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Positive | None = None
    n: Literal[1] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # accepted; no effect
    return_token_ids: bool = False  # dgserve: the choice also carries the generated token ids
    # the diffusion sampler's knobs (MODEL_SPEC section 4); unset: the checkpoint's generation_config.json
    max_denoising_steps: Positive | None = None
    entropy_bound: Finite | None = None
    t_min: Finite | None = None
    t_max: Finite | None = None
    stability_threshold: U32 | None = None
    confidence_threshold: Finite | None = None
    # refused unless null or neutral (UNSUPPORTED says why)
    temperature: Any = None
    top_p: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    stop: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in self.model_fields_set & UNSUPPORTED.keys():
            value = getattr(self, name)
            if value is not None and value != NEUTRAL.get(name):
                raise ValueError(f"__unsupported__:{name}:{UNSUPPORTED[name]}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("__unsupported__:stream_options:only with stream: true")
        return self

    def sampler(self) -> dict:
        """The sampler knobs this request sets, by the engine's names."""
        out = {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}
        if self.max_tokens is not None:
            out["max_new_tokens"] = self.max_tokens
        return out


class ChatCompletionRequest(Request):
    messages: list[Any]  # checked by the chat core, which names the field (`messages[2].tool_call_id`)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted: a reply may hold several calls
    max_completion_tokens: Positive | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, bool] | None = None  # {"enable_thinking": true} (vLLM's and SGLang's field)
    metadata: dict[str, str] | None = None  # accepted; no effect
    store: Literal[False] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or v in ("auto", "none"):
            return v
        raise ValueError("__unsupported__:tool_choice:only \"auto\" or \"none\": the diffusion sampler cannot force a "
                         "tool call")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        extra = sorted(set(v or ()) - {"enable_thinking"})
        if extra:
            raise ValueError(f"__unsupported__:chat_template_kwargs.{extra[0]}:only enable_thinking is taken")
        return v

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and \
                self.max_tokens != self.max_completion_tokens:
            raise ValueError("__unsupported__:max_completion_tokens:differs from max_tokens; set one of them")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def thinking(self) -> bool:
        if self.chat_template_kwargs and "enable_thinking" in self.chat_template_kwargs:
            return self.chat_template_kwargs["enable_thinking"]
        return self.reasoning_effort not in (None, "none")


class CompletionRequest(Request):
    # raw text (no chat template; the tokenizer adds <bos>), or token ids used as they are; a list holds one prompt
    prompt: str | list[U32] | list[str] | list[list[U32]]
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt")
    @classmethod
    def _one(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("__unsupported__:prompt:one prompt per request (send several requests: they are "
                                 "batched by the engine)")
            return v[0]
        return v
