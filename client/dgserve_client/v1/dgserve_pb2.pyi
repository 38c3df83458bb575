from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplerParams(_message.Message):
    __slots__ = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_BOUND_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    STABILITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    def __init__(self, max_new_tokens: _Optional[int] = ..., max_denoising_steps: _Optional[int] = ..., entropy_bound: _Optional[float] = ..., t_min: _Optional[float] = ..., t_max: _Optional[float] = ..., stability_threshold: _Optional[int] = ..., confidence_threshold: _Optional[float] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "seed", "sampler", "stream_drafts", "thinking")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STREAM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    seed: int
    sampler: SamplerParams
    stream_drafts: bool
    thinking: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., seed: _Optional[int] = ..., sampler: _Optional[_Union[SamplerParams, _Mapping]] = ..., stream_drafts: _Optional[bool] = ..., thinking: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("blocks", "steps_per_block", "tokens_per_forward", "time_to_first_block_s", "total_s", "queue_s")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FORWARD_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_BLOCK_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    steps_per_block: _containers.RepeatedScalarFieldContainer[int]
    tokens_per_forward: float
    time_to_first_block_s: float
    total_s: float
    queue_s: float
    def __init__(self, blocks: _Optional[int] = ..., steps_per_block: _Optional[_Iterable[int]] = ..., tokens_per_forward: _Optional[float] = ..., time_to_first_block_s: _Optional[float] = ..., total_s: _Optional[float] = ..., queue_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "usage", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    usage: Usage
    stats: Stats
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("block", "step", "token_ids")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    block: int
    step: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block: _Optional[int] = ..., step: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("block", "token_ids", "text", "steps")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    block: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    steps: int
    def __init__(self, block: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "draft", "block", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft: Draft
    block: Block
    final: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments_json: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "tool_calls", "tool_call_id", "parts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_call_id: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    video: Video
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., video: _Optional[_Union[Video, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "visual_token_budget")
    DATA_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    visual_token_budget: int
    def __init__(self, data: _Optional[bytes] = ..., visual_token_budget: _Optional[int] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("data", "frames", "fps", "visual_token_budget")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    fps: float
    visual_token_budget: int
    def __init__(self, data: _Optional[bytes] = ..., frames: _Optional[_Iterable[bytes]] = ..., fps: _Optional[float] = ..., visual_token_budget: _Optional[int] = ...) -> None: ...

class ToolDeclaration(_message.Message):
    __slots__ = ("name", "description", "parameters_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters_json: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("messages", "tools", "thinking", "seed", "sampler")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    tools: _containers.RepeatedCompositeFieldContainer[ToolDeclaration]
    thinking: bool
    seed: int
    sampler: SamplerParams
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[ToolDeclaration, _Mapping]]] = ..., thinking: _Optional[bool] = ..., seed: _Optional[int] = ..., sampler: _Optional[_Union[SamplerParams, _Mapping]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("request_id", "content", "reasoning", "tool_calls", "finish_reason", "usage", "stats", "token_ids", "malformed_tool_calls")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    content: str
    reasoning: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    finish_reason: str
    usage: Usage
    stats: Stats
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    malformed_tool_calls: int
    def __init__(self, request_id: _Optional[str] = ..., content: _Optional[str] = ..., reasoning: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., malformed_tool_calls: _Optional[int] = ...) -> None: ...

class ChatDelta(_message.Message):
    __slots__ = ("block", "content", "reasoning", "tool_calls")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    block: int
    content: str
    reasoning: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    def __init__(self, block: _Optional[int] = ..., content: _Optional[str] = ..., reasoning: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ...) -> None: ...

class ChatStreamResponse(_message.Message):
    __slots__ = ("request_id", "delta", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    delta: ChatDelta
    final: ChatResponse
    def __init__(self, request_id: _Optional[str] = ..., delta: _Optional[_Union[ChatDelta, _Mapping]] = ..., final: _Optional[_Union[ChatResponse, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "chat", "thinking")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: bool
    thinking: bool
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[bool] = ..., thinking: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Range(_message.Message):
    __slots__ = ("name", "min", "max", "min_exclusive", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    min: float
    max: float
    min_exclusive: bool
    note: str
    def __init__(self, name: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., min_exclusive: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("profile", "units_min", "units_max", "attention_ranks", "expert_ranks", "dtype", "device", "all_to_all", "experts_dtype", "prefix_caching", "prefix_chunk_tokens")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    UNITS_MIN_FIELD_NUMBER: _ClassVar[int]
    UNITS_MAX_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_RANKS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_RANKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ALL_TO_ALL_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    profile: str
    units_min: int
    units_max: int
    attention_ranks: int
    expert_ranks: int
    dtype: str
    device: str
    all_to_all: _containers.RepeatedCompositeFieldContainer[AllToAllRow]
    experts_dtype: str
    prefix_caching: bool
    prefix_chunk_tokens: int
    def __init__(self, profile: _Optional[str] = ..., units_min: _Optional[int] = ..., units_max: _Optional[int] = ..., attention_ranks: _Optional[int] = ..., expert_ranks: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., all_to_all: _Optional[_Iterable[_Union[AllToAllRow, _Mapping]]] = ..., experts_dtype: _Optional[str] = ..., prefix_caching: _Optional[bool] = ..., prefix_chunk_tokens: _Optional[int] = ...) -> None: ...

class AllToAllRow(_message.Message):
    __slots__ = ("bytes", "time_us", "algbw_gbs", "busbw_gbs")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TIME_US_FIELD_NUMBER: _ClassVar[int]
    ALGBW_GBS_FIELD_NUMBER: _ClassVar[int]
    BUSBW_GBS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    time_us: float
    algbw_gbs: float
    busbw_gbs: float
    def __init__(self, bytes: _Optional[int] = ..., time_us: _Optional[float] = ..., algbw_gbs: _Optional[float] = ..., busbw_gbs: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "context_length", "canvas_length", "max_request_bytes", "max_running_per_unit", "max_queued_per_unit", "max_request_s", "max_text_bytes", "max_step_rows")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_ROWS_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    context_length: int
    canvas_length: int
    max_request_bytes: int
    max_running_per_unit: int
    max_queued_per_unit: int
    max_request_s: float
    max_text_bytes: int
    max_step_rows: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., context_length: _Optional[int] = ..., canvas_length: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_running_per_unit: _Optional[int] = ..., max_queued_per_unit: _Optional[int] = ..., max_request_s: _Optional[float] = ..., max_text_bytes: _Optional[int] = ..., max_step_rows: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("api_version", "server_version", "model_id", "model_revision", "topology", "limits", "sampler_defaults", "sampler_ranges", "vocab_size", "vision")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_RANGES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VISION_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    server_version: str
    model_id: str
    model_revision: str
    topology: Topology
    limits: Limits
    sampler_defaults: SamplerParams
    sampler_ranges: _containers.RepeatedCompositeFieldContainer[Range]
    vocab_size: int
    vision: Vision
    def __init__(self, api_version: _Optional[str] = ..., server_version: _Optional[str] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., sampler_defaults: _Optional[_Union[SamplerParams, _Mapping]] = ..., sampler_ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., vocab_size: _Optional[int] = ..., vision: _Optional[_Union[Vision, _Mapping]] = ...) -> None: ...

class Vision(_message.Message):
    __slots__ = ("visual_token_budgets", "default_image_budget", "default_frame_budget", "max_frames", "max_media_parts", "max_media_bytes", "image_formats")
    VISUAL_TOKEN_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FRAME_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEDIA_PARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MEDIA_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    visual_token_budgets: _containers.RepeatedScalarFieldContainer[int]
    default_image_budget: int
    default_frame_budget: int
    max_frames: int
    max_media_parts: int
    max_media_bytes: int
    image_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, visual_token_budgets: _Optional[_Iterable[int]] = ..., default_image_budget: _Optional[int] = ..., default_frame_budget: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_media_parts: _Optional[int] = ..., max_media_bytes: _Optional[int] = ..., image_formats: _Optional[_Iterable[str]] = ...) -> None: ...
