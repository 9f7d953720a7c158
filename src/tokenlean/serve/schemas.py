"""Request bodies of the OpenAI-compatible endpoints (pydantic v2).

Unknown fields are ignored, as OpenAI-compatible servers commonly do. OpenAI fields that
tokenlean cannot honour are declared here so that a non-default value is refused with a
400 naming the field (NOT_SUPPORTED), never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 128  # OpenAI has no fixed default for chat; we pick the CLI's
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (and vLLM's default)
MAX_STOPS = 16
MAX_STOP_CHARS = 1000  # each stop string

# field -> (values that mean "off", why it is refused otherwise)
NOT_SUPPORTED = {
    "n": ((1,), "tokenlean returns one choice per request (n=1)"),
    "best_of": ((None, 1), "tokenlean returns one choice per request (best_of=1)"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "suffix": ((None, ""), "suffix (fill-in-the-middle) is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "response_format": ((None, {"type": "text"}), "structured output (response_format) is "
                        "not supported; only {\"type\": \"text\"}"),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extra (vLLM's): -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = 1
    # refused unless "off" (NOT_SUPPORTED)
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field set to something tokenlean cannot honour."""
        for name, (off, why) in NOT_SUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in off:
                return name, why
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    echo: bool = False  # the prompt's text before the completion
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token
    suffix: str | None = None  # refused (NOT_SUPPORTED)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
