from pdserve.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_DTYPE_UNSPECIFIED: _ClassVar[KVDtype]
    KV_DTYPE_FLOAT32: _ClassVar[KVDtype]
    KV_DTYPE_FLOAT16: _ClassVar[KVDtype]
    KV_DTYPE_BFLOAT16: _ClassVar[KVDtype]

class KVStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STATUS_UNSPECIFIED: _ClassVar[KVStatus]
    KV_STATUS_OK: _ClassVar[KVStatus]
    KV_STATUS_CORRUPT: _ClassVar[KVStatus]
    KV_STATUS_UNKNOWN_RESERVATION: _ClassVar[KVStatus]
    KV_STATUS_STALE_ATTEMPT: _ClassVar[KVStatus]
    KV_STATUS_EXPIRED: _ClassVar[KVStatus]
    KV_STATUS_INCOMPATIBLE: _ClassVar[KVStatus]
    KV_STATUS_UNAUTHENTICATED: _ClassVar[KVStatus]
    KV_STATUS_INVALID: _ClassVar[KVStatus]
    KV_STATUS_DUPLICATE: _ClassVar[KVStatus]
KV_DTYPE_UNSPECIFIED: KVDtype
KV_DTYPE_FLOAT32: KVDtype
KV_DTYPE_FLOAT16: KVDtype
KV_DTYPE_BFLOAT16: KVDtype
KV_STATUS_UNSPECIFIED: KVStatus
KV_STATUS_OK: KVStatus
KV_STATUS_CORRUPT: KVStatus
KV_STATUS_UNKNOWN_RESERVATION: KVStatus
KV_STATUS_STALE_ATTEMPT: KVStatus
KV_STATUS_EXPIRED: KVStatus
KV_STATUS_INCOMPATIBLE: KVStatus
KV_STATUS_UNAUTHENTICATED: KVStatus
KV_STATUS_INVALID: KVStatus
KV_STATUS_DUPLICATE: KVStatus

class KVChunkHeader(_message.Message):
    __slots__ = ("request_id", "attempt_id", "reservation_id", "layer_start", "layer_end", "block_ids", "dtype", "shape", "chunk_index", "num_chunks", "payload_bytes", "crc32c", "compat_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_id: int
    reservation_id: str
    layer_start: int
    layer_end: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: KVDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    chunk_index: int
    num_chunks: int
    payload_bytes: int
    crc32c: int
    compat_hash: int
    def __init__(self, request_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., reservation_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[KVDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., chunk_index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., crc32c: _Optional[int] = ..., compat_hash: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: KVChunkHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[KVChunkHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class KVPushAck(_message.Message):
    __slots__ = ("accepted_chunks", "accepted_bytes", "error", "code")
    ACCEPTED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    accepted_chunks: int
    accepted_bytes: int
    error: str
    code: KVStatus
    def __init__(self, accepted_chunks: _Optional[int] = ..., accepted_bytes: _Optional[int] = ..., error: _Optional[str] = ..., code: _Optional[_Union[KVStatus, str]] = ...) -> None: ...

class CompleteAck(_message.Message):
    __slots__ = ("ok", "code", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    code: KVStatus
    error: str
    def __init__(self, ok: _Optional[bool] = ..., code: _Optional[_Union[KVStatus, str]] = ..., error: _Optional[str] = ...) -> None: ...
