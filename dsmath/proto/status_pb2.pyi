from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_FINISHED: RunState
RUN_STATE_FAILED: RunState

class GeneratorHealth(_message.Message):
    __slots__ = ("id", "alive", "weight_version", "requests", "tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    alive: bool
    weight_version: int
    requests: int
    tokens: int
    def __init__(self, id: _Optional[int] = ..., alive: _Optional[bool] = ..., weight_version: _Optional[int] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("name", "depth", "timeout_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    depth: int
    timeout_rate: float
    def __init__(self, name: _Optional[str] = ..., depth: _Optional[int] = ..., timeout_rate: _Optional[float] = ...) -> None: ...

class TimeSplit(_message.Message):
    __slots__ = ("generate_s", "reward_s", "train_s", "sync_s")
    GENERATE_S_FIELD_NUMBER: _ClassVar[int]
    REWARD_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    SYNC_S_FIELD_NUMBER: _ClassVar[int]
    generate_s: float
    reward_s: float
    train_s: float
    sync_s: float
    def __init__(self, generate_s: _Optional[float] = ..., reward_s: _Optional[float] = ..., train_s: _Optional[float] = ..., sync_s: _Optional[float] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("step", "accuracy")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    step: int
    accuracy: float
    def __init__(self, step: _Optional[int] = ..., accuracy: _Optional[float] = ...) -> None: ...

class RunSnapshot(_message.Message):
    __slots__ = ("run_name", "state", "step", "total_steps", "eta_s", "started_at", "updated_at", "reward_trend", "accuracy_trend", "tokens_per_s", "generators", "queues", "time_split", "last_checkpoint", "last_eval", "message", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REWARD_TREND_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_TREND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATORS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TIME_SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_name: str
    state: RunState
    step: int
    total_steps: int
    eta_s: float
    started_at: float
    updated_at: float
    reward_trend: _containers.RepeatedScalarFieldContainer[float]
    accuracy_trend: _containers.RepeatedScalarFieldContainer[float]
    tokens_per_s: float
    generators: _containers.RepeatedCompositeFieldContainer[GeneratorHealth]
    queues: _containers.RepeatedCompositeFieldContainer[QueueStats]
    time_split: TimeSplit
    last_checkpoint: Checkpoint
    last_eval: EvalResult
    message: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run_name: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., eta_s: _Optional[float] = ..., started_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., reward_trend: _Optional[_Iterable[float]] = ..., accuracy_trend: _Optional[_Iterable[float]] = ..., tokens_per_s: _Optional[float] = ..., generators: _Optional[_Iterable[_Union[GeneratorHealth, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueStats, _Mapping]]] = ..., time_split: _Optional[_Union[TimeSplit, _Mapping]] = ..., last_checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., last_eval: _Optional[_Union[EvalResult, _Mapping]] = ..., message: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
