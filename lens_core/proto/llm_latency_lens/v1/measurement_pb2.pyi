from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
DISTRIBUTION_TYPE_FIXED: DistributionType
DISTRIBUTION_TYPE_NORMAL: DistributionType
DISTRIBUTION_TYPE_UNIFORM: DistributionType
DISTRIBUTION_TYPE_UNSPECIFIED: DistributionType
QUANTIZATION_BF16: Quantization
QUANTIZATION_FP16: Quantization
QUANTIZATION_INT4: Quantization
QUANTIZATION_INT8: Quantization
QUANTIZATION_NONE: Quantization
QUANTIZATION_UNSPECIFIED: Quantization

class AggregatedMetrics(_message.Message):
    __slots__ = ["decode_distribution", "e2e_distribution", "errors", "prefill_distribution", "throughput", "tpot_distribution", "ttft_distribution"]
    DECODE_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    E2E_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    TPOT_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    TTFT_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    decode_distribution: LatencyDistribution
    e2e_distribution: LatencyDistribution
    errors: ErrorMetrics
    prefill_distribution: LatencyDistribution
    throughput: ThroughputMetrics
    tpot_distribution: LatencyDistribution
    ttft_distribution: LatencyDistribution
    def __init__(self, ttft_distribution: _Optional[_Union[LatencyDistribution, _Mapping]] = ..., tpot_distribution: _Optional[_Union[LatencyDistribution, _Mapping]] = ..., e2e_distribution: _Optional[_Union[LatencyDistribution, _Mapping]] = ..., throughput: _Optional[_Union[ThroughputMetrics, _Mapping]] = ..., errors: _Optional[_Union[ErrorMetrics, _Mapping]] = ..., prefill_distribution: _Optional[_Union[LatencyDistribution, _Mapping]] = ..., decode_distribution: _Optional[_Union[LatencyDistribution, _Mapping]] = ...) -> None: ...

class BenchmarkConfiguration(_message.Message):
    __slots__ = ["hardware", "model", "test_params"]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEST_PARAMS_FIELD_NUMBER: _ClassVar[int]
    hardware: HardwareConfig
    model: ModelInfo
    test_params: TestParameters
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., hardware: _Optional[_Union[HardwareConfig, _Mapping]] = ..., test_params: _Optional[_Union[TestParameters, _Mapping]] = ...) -> None: ...

class BenchmarkResults(_message.Message):
    __slots__ = ["aggregated", "benchmark_id", "campaign_level", "config", "document", "measurements", "run_id", "timestamp"]
    AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    aggregated: AggregatedMetrics
    benchmark_id: str
    campaign_level: CampaignLevel
    config: BenchmarkConfiguration
    document: ValueMap
    measurements: _containers.RepeatedCompositeFieldContainer[InferenceMeasurement]
    run_id: str
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, benchmark_id: _Optional[str] = ..., timestamp: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., config: _Optional[_Union[BenchmarkConfiguration, _Mapping]] = ..., measurements: _Optional[_Iterable[_Union[InferenceMeasurement, _Mapping]]] = ..., aggregated: _Optional[_Union[AggregatedMetrics, _Mapping]] = ..., run_id: _Optional[str] = ..., document: _Optional[_Union[ValueMap, _Mapping]] = ..., campaign_level: _Optional[_Union[CampaignLevel, _Mapping]] = ...) -> None: ...

class CampaignLevel(_message.Message):
    __slots__ = ["device_class", "device_id", "errors", "level", "model", "requests", "workload"]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    device_id: str
    errors: int
    level: str
    model: str
    requests: int
    workload: str
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., model: _Optional[str] = ..., workload: _Optional[str] = ..., level: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class CollaborationMetrics(_message.Message):
    __slots__ = ["acceptance_rate", "accepted", "bytes_down", "bytes_up", "cloud_time_ms", "collaboration_overhead_ms", "draft_tokens", "drafted", "edge_time_ms", "network_time_ms", "other", "protocol", "rounds", "rounds_us", "rtt_ms", "strategy", "total_duration_ms", "verify_time_ms"]
    class OtherEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    CLOUD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COLLABORATION_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EDGE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_US_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    acceptance_rate: float
    accepted: int
    bytes_down: int
    bytes_up: int
    cloud_time_ms: float
    collaboration_overhead_ms: float
    draft_tokens: int
    drafted: int
    edge_time_ms: float
    network_time_ms: float
    other: _containers.MessageMap[str, Value]
    protocol: str
    rounds: int
    rounds_us: _containers.RepeatedCompositeFieldContainer[CollaborationRound]
    rtt_ms: float
    strategy: str
    total_duration_ms: float
    verify_time_ms: float
    def __init__(self, strategy: _Optional[str] = ..., protocol: _Optional[str] = ..., draft_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., edge_time_ms: _Optional[float] = ..., cloud_time_ms: _Optional[float] = ..., verify_time_ms: _Optional[float] = ..., network_time_ms: _Optional[float] = ..., rtt_ms: _Optional[float] = ..., collaboration_overhead_ms: _Optional[float] = ..., total_duration_ms: _Optional[float] = ..., other: _Optional[_Mapping[str, Value]] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., rounds_us: _Optional[_Iterable[_Union[CollaborationRound, _Mapping]]] = ...) -> None: ...

class CollaborationRound(_message.Message):
    __slots__ = ["accepted", "draft_us", "drafted", "offset_us", "verify_us"]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_US_FIELD_NUMBER: _ClassVar[int]
    OFFSET_US_FIELD_NUMBER: _ClassVar[int]
    VERIFY_US_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    draft_us: int
    drafted: int
    offset_us: int
    verify_us: int
    def __init__(self, offset_us: _Optional[int] = ..., draft_us: _Optional[int] = ..., verify_us: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class DeviceFacts(_message.Message):
    __slots__ = ["accelerator", "cpu_freq_mhz", "cpu_freq_mhz_max", "device_class", "gpu_freq_mhz", "model", "other", "power_mode", "power_mode_id", "ram_gb", "tags", "temperature_max_c", "temperatures_c"]
    class CpuFreqMhzEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class OtherEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class TemperaturesCEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    CPU_FREQ_MHZ_FIELD_NUMBER: _ClassVar[int]
    CPU_FREQ_MHZ_MAX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    GPU_FREQ_MHZ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAM_GB_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_C_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_MAX_C_FIELD_NUMBER: _ClassVar[int]
    accelerator: str
    cpu_freq_mhz: _containers.ScalarMap[str, float]
    cpu_freq_mhz_max: float
    device_class: str
    gpu_freq_mhz: float
    model: str
    other: _containers.MessageMap[str, Value]
    power_mode: str
    power_mode_id: int
    ram_gb: float
    tags: _containers.RepeatedScalarFieldContainer[str]
    temperature_max_c: float
    temperatures_c: _containers.ScalarMap[str, float]
    def __init__(self, device_class: _Optional[str] = ..., model: _Optional[str] = ..., accelerator: _Optional[str] = ..., power_mode: _Optional[str] = ..., power_mode_id: _Optional[int] = ..., ram_gb: _Optional[float] = ..., gpu_freq_mhz: _Optional[float] = ..., cpu_freq_mhz_max: _Optional[float] = ..., temperature_max_c: _Optional[float] = ..., cpu_freq_mhz: _Optional[_Mapping[str, float]] = ..., temperatures_c: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Iterable[str]] = ..., other: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class EnergyMetrics(_message.Message):
    __slots__ = ["decode_joules", "j_per_output_token", "j_per_prompt_token", "joules_net", "joules_total", "other", "prefill_joules", "rate_hz", "samples", "source"]
    class OtherEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    DECODE_JOULES_FIELD_NUMBER: _ClassVar[int]
    JOULES_NET_FIELD_NUMBER: _ClassVar[int]
    JOULES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    J_PER_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    J_PER_PROMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_JOULES_FIELD_NUMBER: _ClassVar[int]
    RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    decode_joules: float
    j_per_output_token: float
    j_per_prompt_token: float
    joules_net: float
    joules_total: float
    other: _containers.MessageMap[str, Value]
    prefill_joules: float
    rate_hz: float
    samples: int
    source: str
    def __init__(self, source: _Optional[str] = ..., rate_hz: _Optional[float] = ..., samples: _Optional[int] = ..., joules_total: _Optional[float] = ..., joules_net: _Optional[float] = ..., prefill_joules: _Optional[float] = ..., decode_joules: _Optional[float] = ..., j_per_prompt_token: _Optional[float] = ..., j_per_output_token: _Optional[float] = ..., other: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class EngineCounters(_message.Message):
    __slots__ = ["decode_time", "decode_tokens", "prefill_time", "prefill_tokens"]
    DECODE_TIME_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    decode_time: _duration_pb2.Duration
    decode_tokens: int
    prefill_time: _duration_pb2.Duration
    prefill_tokens: int
    def __init__(self, prefill_time: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., prefill_tokens: _Optional[int] = ..., decode_time: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., decode_tokens: _Optional[int] = ...) -> None: ...

class ErrorMetrics(_message.Message):
    __slots__ = ["error_rate", "errors_by_type", "total_errors"]
    class ErrorsByTypeEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ERRORS_BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    error_rate: float
    errors_by_type: _containers.ScalarMap[str, int]
    total_errors: int
    def __init__(self, total_errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., errors_by_type: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HardwareConfig(_message.Message):
    __slots__ = ["batch_size", "cpu_cores", "gpu_count", "gpu_type", "memory_gb"]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    cpu_cores: int
    gpu_count: int
    gpu_type: str
    memory_gb: float
    def __init__(self, gpu_type: _Optional[str] = ..., gpu_count: _Optional[int] = ..., cpu_cores: _Optional[int] = ..., memory_gb: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class InferenceMeasurement(_message.Message):
    __slots__ = ["collaboration", "device_facts", "device_id", "engine_counters", "error_message", "error_type", "ext", "extra_fields", "first_after_load", "kind", "latency", "measurement_id", "model_info", "ok", "output_text", "prompt_id", "prompt_index", "prompt_sha256", "prompt_text", "received_at", "record_version", "resources", "run_id", "stop_reason", "strategy", "timestamp", "tokens", "warmup"]
    class ExtEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class ExtraFieldsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    COLLABORATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FACTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELDS_FIELD_NUMBER: _ClassVar[int]
    EXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_AFTER_LOAD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    RECORD_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    collaboration: CollaborationMetrics
    device_facts: DeviceFacts
    device_id: str
    engine_counters: EngineCounters
    error_message: str
    error_type: str
    ext: _containers.MessageMap[str, Value]
    extra_fields: _containers.MessageMap[str, Value]
    first_after_load: bool
    kind: str
    latency: LatencyMetrics
    measurement_id: str
    model_info: ModelInfo
    ok: bool
    output_text: str
    prompt_id: str
    prompt_index: int
    prompt_sha256: bytes
    prompt_text: str
    received_at: _timestamp_pb2.Timestamp
    record_version: int
    resources: ResourceMetrics
    run_id: str
    stop_reason: str
    strategy: str
    timestamp: _timestamp_pb2.Timestamp
    tokens: TokenMetrics
    warmup: bool
    def __init__(self, measurement_id: _Optional[str] = ..., timestamp: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., model_info: _Optional[_Union[ModelInfo, _Mapping]] = ..., latency: _Optional[_Union[LatencyMetrics, _Mapping]] = ..., tokens: _Optional[_Union[TokenMetrics, _Mapping]] = ..., resources: _Optional[_Union[ResourceMetrics, _Mapping]] = ..., record_version: _Optional[int] = ..., device_id: _Optional[str] = ..., run_id: _Optional[str] = ..., kind: _Optional[str] = ..., ok: bool = ..., strategy: _Optional[str] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., stop_reason: _Optional[str] = ..., prompt_index: _Optional[int] = ..., prompt_id: _Optional[str] = ..., prompt_sha256: _Optional[bytes] = ..., warmup: bool = ..., first_after_load: bool = ..., prompt_text: _Optional[str] = ..., output_text: _Optional[str] = ..., engine_counters: _Optional[_Union[EngineCounters, _Mapping]] = ..., collaboration: _Optional[_Union[CollaborationMetrics, _Mapping]] = ..., device_facts: _Optional[_Union[DeviceFacts, _Mapping]] = ..., ext: _Optional[_Mapping[str, Value]] = ..., extra_fields: _Optional[_Mapping[str, Value]] = ..., received_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InterTokenGaps(_message.Message):
    __slots__ = ["gaps_us"]
    GAPS_US_FIELD_NUMBER: _ClassVar[int]
    gaps_us: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gaps_us: _Optional[_Iterable[int]] = ...) -> None: ...

class LatencyDistribution(_message.Message):
    __slots__ = ["max_ms", "mean_ms", "median_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p999_ms", "p99_ms", "sample_count", "stddev_ms"]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P999_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    STDDEV_MS_FIELD_NUMBER: _ClassVar[int]
    max_ms: float
    mean_ms: float
    median_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p999_ms: float
    p99_ms: float
    sample_count: int
    stddev_ms: float
    def __init__(self, mean_ms: _Optional[float] = ..., median_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., p999_ms: _Optional[float] = ..., min_ms: _Optional[float] = ..., max_ms: _Optional[float] = ..., stddev_ms: _Optional[float] = ..., sample_count: _Optional[int] = ...) -> None: ...

class LatencyMetrics(_message.Message):
    __slots__ = ["decode_time", "end_to_end_latency", "inter_token_gaps", "prefill_time", "time_per_output_token", "time_to_first_token"]
    DECODE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TO_END_LATENCY_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_GAPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decode_time: _duration_pb2.Duration
    end_to_end_latency: _duration_pb2.Duration
    inter_token_gaps: InterTokenGaps
    prefill_time: _duration_pb2.Duration
    time_per_output_token: _duration_pb2.Duration
    time_to_first_token: _duration_pb2.Duration
    def __init__(self, time_to_first_token: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., time_per_output_token: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., end_to_end_latency: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., prefill_time: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., decode_time: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., inter_token_gaps: _Optional[_Union[InterTokenGaps, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ["endpoint", "name", "provider", "quantization", "sha256", "version"]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    name: str
    provider: str
    quantization: Quantization
    sha256: bytes
    version: str
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., endpoint: _Optional[str] = ..., version: _Optional[str] = ..., quantization: _Optional[_Union[Quantization, str]] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class ResourceMetrics(_message.Message):
    __slots__ = ["energy", "gpu_utilization_percent", "kv_cache_utilization_percent", "memory_utilization_percent", "power_consumption_watts", "rss_before_bytes", "rss_peak_bytes", "rss_peak_source"]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    POWER_CONSUMPTION_WATTS_FIELD_NUMBER: _ClassVar[int]
    RSS_BEFORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_PEAK_SOURCE_FIELD_NUMBER: _ClassVar[int]
    energy: EnergyMetrics
    gpu_utilization_percent: float
    kv_cache_utilization_percent: float
    memory_utilization_percent: float
    power_consumption_watts: float
    rss_before_bytes: int
    rss_peak_bytes: int
    rss_peak_source: str
    def __init__(self, gpu_utilization_percent: _Optional[float] = ..., memory_utilization_percent: _Optional[float] = ..., kv_cache_utilization_percent: _Optional[float] = ..., power_consumption_watts: _Optional[float] = ..., rss_before_bytes: _Optional[int] = ..., rss_peak_bytes: _Optional[int] = ..., rss_peak_source: _Optional[str] = ..., energy: _Optional[_Union[EnergyMetrics, _Mapping]] = ...) -> None: ...

class TestParameters(_message.Message):
    __slots__ = ["concurrency_levels", "input_tokens", "output_tokens", "total_requests", "warmup_requests"]
    CONCURRENCY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    concurrency_levels: _containers.RepeatedScalarFieldContainer[int]
    input_tokens: TokenDistribution
    output_tokens: TokenDistribution
    total_requests: int
    warmup_requests: int
    def __init__(self, input_tokens: _Optional[_Union[TokenDistribution, _Mapping]] = ..., output_tokens: _Optional[_Union[TokenDistribution, _Mapping]] = ..., concurrency_levels: _Optional[_Iterable[int]] = ..., warmup_requests: _Optional[int] = ..., total_requests: _Optional[int] = ...) -> None: ...

class ThroughputMetrics(_message.Message):
    __slots__ = ["requests_per_second", "tokens_per_second", "tokens_per_second_per_gpu"]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: float
    tokens_per_second: float
    tokens_per_second_per_gpu: float
    def __init__(self, requests_per_second: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., tokens_per_second_per_gpu: _Optional[float] = ...) -> None: ...

class TokenDistribution(_message.Message):
    __slots__ = ["distribution", "mean", "stddev"]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    distribution: DistributionType
    mean: int
    stddev: int
    def __init__(self, mean: _Optional[int] = ..., stddev: _Optional[int] = ..., distribution: _Optional[_Union[DistributionType, str]] = ...) -> None: ...

class TokenMetrics(_message.Message):
    __slots__ = ["input_tokens", "output_tokens", "tokens_per_second"]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    tokens_per_second: float
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ["bool_value", "double_value", "int_value", "list_value", "map_value", "string_value"]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAP_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    bool_value: bool
    double_value: float
    int_value: int
    list_value: ValueList
    map_value: ValueMap
    string_value: str
    def __init__(self, bool_value: bool = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., map_value: _Optional[_Union[ValueMap, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ["values"]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ["fields"]
    class FieldsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, Value]
    def __init__(self, fields: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Quantization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class DistributionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
