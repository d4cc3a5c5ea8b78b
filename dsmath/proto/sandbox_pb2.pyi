from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RunRequest(_message.Message):
    __slots__ = ("code", "timeout_s", "memory_mb", "max_output_bytes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    code: str
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    def __init__(self, code: _Optional[str] = ..., timeout_s: _Optional[float] = ..., memory_mb: _Optional[int] = ..., max_output_bytes: _Optional[int] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("stdout", "stderr", "has_exit_code", "exit_code", "timed_out", "memory_exceeded", "output_truncated", "signal", "wall_s", "cpu_s")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    stdout: str
    stderr: str
    has_exit_code: bool
    exit_code: int
    timed_out: bool
    memory_exceeded: bool
    output_truncated: bool
    signal: int
    wall_s: float
    cpu_s: float
    def __init__(self, stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., has_exit_code: _Optional[bool] = ..., exit_code: _Optional[int] = ..., timed_out: _Optional[bool] = ..., memory_exceeded: _Optional[bool] = ..., output_truncated: _Optional[bool] = ..., signal: _Optional[int] = ..., wall_s: _Optional[float] = ..., cpu_s: _Optional[float] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("workers", "busy", "queued", "max_queue", "runs", "timeouts", "rejected", "namespaces")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    workers: int
    busy: int
    queued: int
    max_queue: int
    runs: int
    timeouts: int
    rejected: int
    namespaces: bool
    def __init__(self, workers: _Optional[int] = ..., busy: _Optional[int] = ..., queued: _Optional[int] = ..., max_queue: _Optional[int] = ..., runs: _Optional[int] = ..., timeouts: _Optional[int] = ..., rejected: _Optional[int] = ..., namespaces: _Optional[bool] = ...) -> None: ...
