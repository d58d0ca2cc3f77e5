from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("camera", "data", "sha256")
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    camera: str
    data: bytes
    sha256: str
    def __init__(self, camera: _Optional[str] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("images", "instruction", "state", "episode_id", "noise_seed", "image_b64", "image_sha256", "noise")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_B64_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    instruction: str
    state: _containers.RepeatedScalarFieldContainer[float]
    episode_id: str
    noise_seed: int
    image_b64: bytes
    image_sha256: str
    noise: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., instruction: _Optional[str] = ..., state: _Optional[_Iterable[float]] = ..., episode_id: _Optional[str] = ..., noise_seed: _Optional[int] = ..., image_b64: _Optional[bytes] = ..., image_sha256: _Optional[str] = ..., noise: _Optional[_Iterable[float]] = ...) -> None: ...

class Latency(_message.Message):
    __slots__ = ("total_ms", "queue_ms", "decode_ms", "prefix_ms", "denoise_ms", "postprocess_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    queue_ms: float
    decode_ms: float
    prefix_ms: float
    denoise_ms: float
    postprocess_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., prefix_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ...) -> None: ...

class Denoise(_message.Message):
    __slots__ = ("steps_used", "steps_configured", "adaptive")
    STEPS_USED_FIELD_NUMBER: _ClassVar[int]
    STEPS_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    steps_used: int
    steps_configured: int
    adaptive: bool
    def __init__(self, steps_used: _Optional[int] = ..., steps_configured: _Optional[int] = ..., adaptive: bool = ...) -> None: ...

class ActError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("actions", "num_actions", "action_dim", "seq", "noise_seed", "mode", "cache", "latency", "denoise", "model_hash", "recorded", "error")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[float]
    num_actions: int
    action_dim: int
    seq: int
    noise_seed: int
    mode: str
    cache: str
    latency: Latency
    denoise: Denoise
    model_hash: str
    recorded: bool
    error: ActError
    def __init__(self, actions: _Optional[_Iterable[float]] = ..., num_actions: _Optional[int] = ..., action_dim: _Optional[int] = ..., seq: _Optional[int] = ..., noise_seed: _Optional[int] = ..., mode: _Optional[str] = ..., cache: _Optional[str] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., denoise: _Optional[_Union[Denoise, _Mapping]] = ..., model_hash: _Optional[str] = ..., recorded: bool = ..., error: _Optional[_Union[ActError, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_hash", "config_hash", "model_type", "export_kind", "embodiment", "cameras", "image_height", "image_width", "state_dim", "action_dim", "chunk_size", "denoise_steps", "mode", "reflex_version", "session_id", "max_instruction_tokens", "noise_width", "export")
    class ExportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_KIND_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENT_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DENOISE_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REFLEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTRUCTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NOISE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    config_hash: str
    model_type: str
    export_kind: str
    embodiment: str
    cameras: _containers.RepeatedScalarFieldContainer[str]
    image_height: int
    image_width: int
    state_dim: int
    action_dim: int
    chunk_size: int
    denoise_steps: int
    mode: str
    reflex_version: str
    session_id: str
    max_instruction_tokens: int
    noise_width: int
    export: _containers.ScalarMap[str, str]
    def __init__(self, model_hash: _Optional[str] = ..., config_hash: _Optional[str] = ..., model_type: _Optional[str] = ..., export_kind: _Optional[str] = ..., embodiment: _Optional[str] = ..., cameras: _Optional[_Iterable[str]] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., state_dim: _Optional[int] = ..., action_dim: _Optional[int] = ..., chunk_size: _Optional[int] = ..., denoise_steps: _Optional[int] = ..., mode: _Optional[str] = ..., reflex_version: _Optional[str] = ..., session_id: _Optional[str] = ..., max_instruction_tokens: _Optional[int] = ..., noise_width: _Optional[int] = ..., export: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecordEvent(_message.Message):
    __slots__ = ("start", "act", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    ACT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    act: ActRecord
    end: SessionEnd
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., act: _Optional[_Union[ActRecord, _Mapping]] = ..., end: _Optional[_Union[SessionEnd, _Mapping]] = ...) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("session_id", "reflex_version", "model_hash", "config_hash", "export_dir", "model_type", "export_kind", "embodiment", "mode", "hardware", "image_mode", "instruction_mode", "no_gzip", "started_at", "first_seq", "export")
    class HardwareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ExportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REFLEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    EXPORT_DIR_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_KIND_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_MODE_FIELD_NUMBER: _ClassVar[int]
    NO_GZIP_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reflex_version: str
    model_hash: str
    config_hash: str
    export_dir: str
    model_type: str
    export_kind: str
    embodiment: str
    mode: str
    hardware: _containers.ScalarMap[str, str]
    image_mode: str
    instruction_mode: str
    no_gzip: bool
    started_at: str
    first_seq: int
    export: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., reflex_version: _Optional[str] = ..., model_hash: _Optional[str] = ..., config_hash: _Optional[str] = ..., export_dir: _Optional[str] = ..., model_type: _Optional[str] = ..., export_kind: _Optional[str] = ..., embodiment: _Optional[str] = ..., mode: _Optional[str] = ..., hardware: _Optional[_Mapping[str, str]] = ..., image_mode: _Optional[str] = ..., instruction_mode: _Optional[str] = ..., no_gzip: bool = ..., started_at: _Optional[str] = ..., first_seq: _Optional[int] = ..., export: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ActRecord(_message.Message):
    __slots__ = ("seq", "chunk_id", "timestamp", "request", "actions", "num_actions", "action_dim", "latency", "denoise", "cache", "mode", "noise_seed", "error")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    chunk_id: int
    timestamp: str
    request: ActRequest
    actions: _containers.RepeatedScalarFieldContainer[float]
    num_actions: int
    action_dim: int
    latency: Latency
    denoise: Denoise
    cache: str
    mode: str
    noise_seed: int
    error: ActError
    def __init__(self, seq: _Optional[int] = ..., chunk_id: _Optional[int] = ..., timestamp: _Optional[str] = ..., request: _Optional[_Union[ActRequest, _Mapping]] = ..., actions: _Optional[_Iterable[float]] = ..., num_actions: _Optional[int] = ..., action_dim: _Optional[int] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., denoise: _Optional[_Union[Denoise, _Mapping]] = ..., cache: _Optional[str] = ..., mode: _Optional[str] = ..., noise_seed: _Optional[int] = ..., error: _Optional[_Union[ActError, _Mapping]] = ...) -> None: ...

class SessionEnd(_message.Message):
    __slots__ = ("reason", "total_requests", "dropped_requests", "ended_at", "refused_requests")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    total_requests: int
    dropped_requests: int
    ended_at: str
    refused_requests: int
    def __init__(self, reason: _Optional[str] = ..., total_requests: _Optional[int] = ..., dropped_requests: _Optional[int] = ..., ended_at: _Optional[str] = ..., refused_requests: _Optional[int] = ...) -> None: ...

class RecordSummary(_message.Message):
    __slots__ = ("file", "records_written", "bytes_written")
    FILE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    file: str
    records_written: int
    bytes_written: int
    def __init__(self, file: _Optional[str] = ..., records_written: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "file", "records_written", "bytes_written", "dropped_requests", "degraded", "model_hash", "lost_requests")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    LOST_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    file: str
    records_written: int
    bytes_written: int
    dropped_requests: int
    degraded: bool
    model_hash: str
    lost_requests: int
    def __init__(self, session_id: _Optional[str] = ..., file: _Optional[str] = ..., records_written: _Optional[int] = ..., bytes_written: _Optional[int] = ..., dropped_requests: _Optional[int] = ..., degraded: bool = ..., model_hash: _Optional[str] = ..., lost_requests: _Optional[int] = ...) -> None: ...

class RecorderStatus(_message.Message):
    __slots__ = ("dir", "sessions", "sessions_total", "records_written", "bytes_written", "dropped_requests", "degraded", "degraded_reason", "reflex_version", "lost_requests")
    DIR_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    REFLEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOST_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    dir: str
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    sessions_total: int
    records_written: int
    bytes_written: int
    dropped_requests: int
    degraded: bool
    degraded_reason: str
    reflex_version: str
    lost_requests: int
    def __init__(self, dir: _Optional[str] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ..., sessions_total: _Optional[int] = ..., records_written: _Optional[int] = ..., bytes_written: _Optional[int] = ..., dropped_requests: _Optional[int] = ..., degraded: bool = ..., degraded_reason: _Optional[str] = ..., reflex_version: _Optional[str] = ..., lost_requests: _Optional[int] = ...) -> None: ...
