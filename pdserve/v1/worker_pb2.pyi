from pdserve.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_BOTH: _ClassVar[Role]

class WorkerErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ERROR_UNSPECIFIED: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_NONE: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_NO_CAPACITY: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_INVALID: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_TRANSFER: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_CANCELLED: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_DEADLINE: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_INTERNAL: _ClassVar[WorkerErrorCode]
    WORKER_ERROR_DRAINING: _ClassVar[WorkerErrorCode]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_BOTH: Role
WORKER_ERROR_UNSPECIFIED: WorkerErrorCode
WORKER_ERROR_NONE: WorkerErrorCode
WORKER_ERROR_NO_CAPACITY: WorkerErrorCode
WORKER_ERROR_INVALID: WorkerErrorCode
WORKER_ERROR_TRANSFER: WorkerErrorCode
WORKER_ERROR_CANCELLED: WorkerErrorCode
WORKER_ERROR_DEADLINE: WorkerErrorCode
WORKER_ERROR_INTERNAL: WorkerErrorCode
WORKER_ERROR_DRAINING: WorkerErrorCode

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "attempt_id", "num_prompt_tokens", "prompt_token_ids", "lease_ms", "sampling", "router_id", "deadline_unix_ms", "resume_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    num_prompt_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    lease_ms: int
    sampling: _generation_pb2.SamplingParams
    router_id: str
    deadline_unix_ms: int
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., lease_ms: _Optional[int] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., router_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., resume_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("reservation_id", "decode_worker_id", "endpoint", "block_ids", "num_tokens", "lease_expiry_unix_ms", "compat_hash", "attempt_id", "transport", "block_size", "num_cached_tokens", "transport_params")
    class TransportParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    decode_worker_id: str
    endpoint: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    lease_expiry_unix_ms: int
    compat_hash: int
    attempt_id: int
    transport: str
    block_size: int
    num_cached_tokens: int
    transport_params: _containers.ScalarMap[str, str]
    def __init__(self, reservation_id: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., lease_expiry_unix_ms: _Optional[int] = ..., compat_hash: _Optional[int] = ..., attempt_id: _Optional[int] = ..., transport: _Optional[str] = ..., block_size: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., transport_params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PrefillTask(_message.Message):
    __slots__ = ("request_id", "attempt_id", "prompt_token_ids", "sampling", "reservation", "deadline_unix_ms", "reservation_follows", "resume_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    reservation: Reservation
    deadline_unix_ms: int
    reservation_follows: bool
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., reservation: _Optional[_Union[Reservation, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., reservation_follows: _Optional[bool] = ..., resume_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AttachReservation(_message.Message):
    __slots__ = ("request_id", "attempt_id", "reservation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    reservation: Reservation
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., reservation: _Optional[_Union[Reservation, _Mapping]] = ...) -> None: ...

class CompletionRecord(_message.Message):
    __slots__ = ("request_id", "attempt_id", "reservation_id", "first_token_id", "first_token_logprob", "first_top_logprobs", "num_prompt_tokens", "num_cached_tokens", "kv_checksum", "num_chunks", "kv_bytes", "prefill_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    reservation_id: str
    first_token_id: int
    first_token_logprob: float
    first_top_logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TopLogprob]
    num_prompt_tokens: int
    num_cached_tokens: int
    kv_checksum: int
    num_chunks: int
    kv_bytes: int
    prefill_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., reservation_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_token_logprob: _Optional[float] = ..., first_top_logprobs: _Optional[_Iterable[_Union[_generation_pb2.TopLogprob, _Mapping]]] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., kv_checksum: _Optional[int] = ..., num_chunks: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ...) -> None: ...

class ReleaseReservation(_message.Message):
    __slots__ = ("reservation_id", "request_id", "attempt_id", "reason")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    request_id: str
    attempt_id: int
    reason: str
    def __init__(self, reservation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "role", "num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "kv_usage", "draining", "timestamp_unix_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_usage: float
    draining: bool
    timestamp_unix_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_usage: _Optional[float] = ..., draining: _Optional[bool] = ..., timestamp_unix_ms: _Optional[int] = ...) -> None: ...

class DecodeOutput(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish_reason", "stop_reason", "error", "attempt_id", "first_token_index", "stop_token_id", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    finish_reason: _generation_pb2.FinishReason
    stop_reason: str
    error: str
    attempt_id: int
    first_token_index: int
    stop_token_id: int
    usage: _generation_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., stop_reason: _Optional[str] = ..., error: _Optional[str] = ..., attempt_id: _Optional[int] = ..., first_token_index: _Optional[int] = ..., stop_token_id: _Optional[int] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ...) -> None: ...

class DecodeOutputBatch(_message.Message):
    __slots__ = ("outputs", "decode_worker_id", "step")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[DecodeOutput]
    decode_worker_id: str
    step: int
    def __init__(self, outputs: _Optional[_Iterable[_Union[DecodeOutput, _Mapping]]] = ..., decode_worker_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("reservation", "code", "error")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    code: WorkerErrorCode
    error: str
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ..., code: _Optional[_Union[WorkerErrorCode, str]] = ..., error: _Optional[str] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("code", "error", "record", "prefill_seconds", "transfer_seconds", "first_token")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    code: WorkerErrorCode
    error: str
    record: CompletionRecord
    prefill_seconds: float
    transfer_seconds: float
    first_token: FirstToken
    def __init__(self, code: _Optional[_Union[WorkerErrorCode, str]] = ..., error: _Optional[str] = ..., record: _Optional[_Union[CompletionRecord, _Mapping]] = ..., prefill_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: _generation_pb2.TokenLogprob
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[_Union[_generation_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "attempt_id", "prompt_token_ids", "sampling", "router_id", "deadline_unix_ms", "resume_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    router_id: str
    deadline_unix_ms: int
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., router_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., resume_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("code", "error")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    code: WorkerErrorCode
    error: str
    def __init__(self, code: _Optional[_Union[WorkerErrorCode, str]] = ..., error: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "kv_endpoint", "compat_hash", "block_size", "num_blocks", "max_model_len", "model_name", "node_ip", "dist_rank", "pid", "metrics_endpoint")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    DIST_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    kv_endpoint: str
    compat_hash: int
    block_size: int
    num_blocks: int
    max_model_len: int
    model_name: str
    node_ip: str
    dist_rank: int
    pid: int
    metrics_endpoint: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., kv_endpoint: _Optional[str] = ..., compat_hash: _Optional[int] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., max_model_len: _Optional[int] = ..., model_name: _Optional[str] = ..., node_ip: _Optional[str] = ..., dist_rank: _Optional[int] = ..., pid: _Optional[int] = ..., metrics_endpoint: _Optional[str] = ...) -> None: ...
