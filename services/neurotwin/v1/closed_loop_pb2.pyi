from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClosedLoopModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TwinGuidance(_message.Message):
    __slots__ = ("twin", "twin_neurons", "candidates_per_presentation", "refit_readout")
    TWIN_FIELD_NUMBER: _ClassVar[int]
    TWIN_NEURONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_PER_PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    REFIT_READOUT_FIELD_NUMBER: _ClassVar[int]
    twin: ClosedLoopModelRef
    twin_neurons: _containers.RepeatedScalarFieldContainer[int]
    candidates_per_presentation: int
    refit_readout: bool
    def __init__(self, twin: _Optional[_Union[ClosedLoopModelRef, _Mapping]] = ..., twin_neurons: _Optional[_Iterable[int]] = ..., candidates_per_presentation: _Optional[int] = ..., refit_readout: _Optional[bool] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "generator", "optimizer", "optimizer_options", "population_size", "natural_per_generation", "natural_source", "natural_images", "neuron_count", "neuron_ids", "target_neurons", "objective", "seed", "max_generations", "image_size", "image_format", "guidance", "description", "metadata", "confirmation")
    class OptimizerOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    NATURAL_PER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    NATURAL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NATURAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEURON_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEURON_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEURONS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generator: ClosedLoopModelRef
    optimizer: str
    optimizer_options: _containers.ScalarMap[str, float]
    population_size: int
    natural_per_generation: int
    natural_source: str
    natural_images: _containers.RepeatedScalarFieldContainer[bytes]
    neuron_count: int
    neuron_ids: _containers.RepeatedScalarFieldContainer[str]
    target_neurons: _containers.RepeatedScalarFieldContainer[int]
    objective: str
    seed: int
    max_generations: int
    image_size: int
    image_format: str
    guidance: TwinGuidance
    description: str
    metadata: RecordingMetadata
    confirmation: Confirmation
    def __init__(self, session_id: _Optional[str] = ..., generator: _Optional[_Union[ClosedLoopModelRef, _Mapping]] = ..., optimizer: _Optional[str] = ..., optimizer_options: _Optional[_Mapping[str, float]] = ..., population_size: _Optional[int] = ..., natural_per_generation: _Optional[int] = ..., natural_source: _Optional[str] = ..., natural_images: _Optional[_Iterable[bytes]] = ..., neuron_count: _Optional[int] = ..., neuron_ids: _Optional[_Iterable[str]] = ..., target_neurons: _Optional[_Iterable[int]] = ..., objective: _Optional[str] = ..., seed: _Optional[int] = ..., max_generations: _Optional[int] = ..., image_size: _Optional[int] = ..., image_format: _Optional[str] = ..., guidance: _Optional[_Union[TwinGuidance, _Mapping]] = ..., description: _Optional[str] = ..., metadata: _Optional[_Union[RecordingMetadata, _Mapping]] = ..., confirmation: _Optional[_Union[Confirmation, _Mapping]] = ...) -> None: ...

class Confirmation(_message.Message):
    __slots__ = ("top_candidates", "repeats", "disabled")
    TOP_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    top_candidates: int
    repeats: int
    disabled: bool
    def __init__(self, top_candidates: _Optional[int] = ..., repeats: _Optional[int] = ..., disabled: _Optional[bool] = ...) -> None: ...

class RecordingMetadata(_message.Message):
    __slots__ = ("subject_id", "species", "sex", "age", "subject_description", "session_description", "experimenter", "lab", "institution", "experiment_description", "protocol", "device_name", "device_description", "device_manufacturer", "brain_area", "response_units", "presentation_duration", "session_start_time")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SPECIES_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SESSION_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTER_FIELD_NUMBER: _ClassVar[int]
    LAB_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    BRAIN_AREA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_UNITS_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_DURATION_FIELD_NUMBER: _ClassVar[int]
    SESSION_START_TIME_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    species: str
    sex: str
    age: str
    subject_description: str
    session_description: str
    experimenter: _containers.RepeatedScalarFieldContainer[str]
    lab: str
    institution: str
    experiment_description: str
    protocol: str
    device_name: str
    device_description: str
    device_manufacturer: str
    brain_area: str
    response_units: str
    presentation_duration: float
    session_start_time: float
    def __init__(self, subject_id: _Optional[str] = ..., species: _Optional[str] = ..., sex: _Optional[str] = ..., age: _Optional[str] = ..., subject_description: _Optional[str] = ..., session_description: _Optional[str] = ..., experimenter: _Optional[_Iterable[str]] = ..., lab: _Optional[str] = ..., institution: _Optional[str] = ..., experiment_description: _Optional[str] = ..., protocol: _Optional[str] = ..., device_name: _Optional[str] = ..., device_description: _Optional[str] = ..., device_manufacturer: _Optional[str] = ..., brain_area: _Optional[str] = ..., response_units: _Optional[str] = ..., presentation_duration: _Optional[float] = ..., session_start_time: _Optional[float] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("session_id", "omit_images")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    omit_images: bool
    def __init__(self, session_id: _Optional[str] = ..., omit_images: _Optional[bool] = ...) -> None: ...

class ClosedLoopStimulus(_message.Message):
    __slots__ = ("stimulus_id", "index", "kind", "image", "sha256", "natural_name", "predicted_rates", "predicted_score", "repeat_of")
    STIMULUS_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NATURAL_NAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    REPEAT_OF_FIELD_NUMBER: _ClassVar[int]
    stimulus_id: str
    index: int
    kind: str
    image: bytes
    sha256: str
    natural_name: str
    predicted_rates: _containers.RepeatedScalarFieldContainer[float]
    predicted_score: float
    repeat_of: str
    def __init__(self, stimulus_id: _Optional[str] = ..., index: _Optional[int] = ..., kind: _Optional[str] = ..., image: _Optional[bytes] = ..., sha256: _Optional[str] = ..., natural_name: _Optional[str] = ..., predicted_rates: _Optional[_Iterable[float]] = ..., predicted_score: _Optional[float] = ..., repeat_of: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("session_id", "generation", "finished", "stimuli", "image_format", "created_time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    STIMULI_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    finished: bool
    stimuli: _containers.RepeatedCompositeFieldContainer[ClosedLoopStimulus]
    image_format: str
    created_time: float
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., finished: _Optional[bool] = ..., stimuli: _Optional[_Iterable[_Union[ClosedLoopStimulus, _Mapping]]] = ..., image_format: _Optional[str] = ..., created_time: _Optional[float] = ...) -> None: ...

class ResponseRepeat(_message.Message):
    __slots__ = ("rates",)
    RATES_FIELD_NUMBER: _ClassVar[int]
    rates: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rates: _Optional[_Iterable[float]] = ...) -> None: ...

class StimulusResponse(_message.Message):
    __slots__ = ("stimulus_id", "rates", "repeats", "onset_time", "duration", "onset_known")
    STIMULUS_ID_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    ONSET_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ONSET_KNOWN_FIELD_NUMBER: _ClassVar[int]
    stimulus_id: str
    rates: _containers.RepeatedScalarFieldContainer[float]
    repeats: _containers.RepeatedCompositeFieldContainer[ResponseRepeat]
    onset_time: float
    duration: float
    onset_known: bool
    def __init__(self, stimulus_id: _Optional[str] = ..., rates: _Optional[_Iterable[float]] = ..., repeats: _Optional[_Iterable[_Union[ResponseRepeat, _Mapping]]] = ..., onset_time: _Optional[float] = ..., duration: _Optional[float] = ..., onset_known: _Optional[bool] = ...) -> None: ...

class TellRequest(_message.Message):
    __slots__ = ("session_id", "generation", "responses", "partial")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    responses: _containers.RepeatedCompositeFieldContainer[StimulusResponse]
    partial: bool
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., responses: _Optional[_Iterable[_Union[StimulusResponse, _Mapping]]] = ..., partial: _Optional[bool] = ...) -> None: ...

class BestSoFar(_message.Message):
    __slots__ = ("generation", "stimulus_id", "score", "target_rates", "best_natural_stimulus_id", "best_natural_score", "last_generation_mean", "last_generation_max", "confirmed", "confirmation_candidates")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STIMULUS_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATES_FIELD_NUMBER: _ClassVar[int]
    BEST_NATURAL_STIMULUS_ID_FIELD_NUMBER: _ClassVar[int]
    BEST_NATURAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_MAX_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATION_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    stimulus_id: str
    score: float
    target_rates: _containers.RepeatedScalarFieldContainer[float]
    best_natural_stimulus_id: str
    best_natural_score: float
    last_generation_mean: float
    last_generation_max: float
    confirmed: ConfirmedStimulus
    confirmation_candidates: _containers.RepeatedCompositeFieldContainer[ConfirmedStimulus]
    def __init__(self, generation: _Optional[int] = ..., stimulus_id: _Optional[str] = ..., score: _Optional[float] = ..., target_rates: _Optional[_Iterable[float]] = ..., best_natural_stimulus_id: _Optional[str] = ..., best_natural_score: _Optional[float] = ..., last_generation_mean: _Optional[float] = ..., last_generation_max: _Optional[float] = ..., confirmed: _Optional[_Union[ConfirmedStimulus, _Mapping]] = ..., confirmation_candidates: _Optional[_Iterable[_Union[ConfirmedStimulus, _Mapping]]] = ...) -> None: ...

class ConfirmedStimulus(_message.Message):
    __slots__ = ("stimulus_id", "generation", "first_score", "mean_score", "std_score", "sem_score", "n", "target_rates")
    STIMULUS_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    STD_SCORE_FIELD_NUMBER: _ClassVar[int]
    SEM_SCORE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATES_FIELD_NUMBER: _ClassVar[int]
    stimulus_id: str
    generation: int
    first_score: float
    mean_score: float
    std_score: float
    sem_score: float
    n: int
    target_rates: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, stimulus_id: _Optional[str] = ..., generation: _Optional[int] = ..., first_score: _Optional[float] = ..., mean_score: _Optional[float] = ..., std_score: _Optional[float] = ..., sem_score: _Optional[float] = ..., n: _Optional[int] = ..., target_rates: _Optional[_Iterable[float]] = ...) -> None: ...

class TellResponse(_message.Message):
    __slots__ = ("session_id", "generation", "generation_complete", "missing_stimulus_ids", "best", "generations_told", "presentations_told", "finished")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MISSING_STIMULUS_IDS_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_TOLD_FIELD_NUMBER: _ClassVar[int]
    PRESENTATIONS_TOLD_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    generation_complete: bool
    missing_stimulus_ids: _containers.RepeatedScalarFieldContainer[str]
    best: BestSoFar
    generations_told: int
    presentations_told: int
    finished: bool
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., generation_complete: _Optional[bool] = ..., missing_stimulus_ids: _Optional[_Iterable[str]] = ..., best: _Optional[_Union[BestSoFar, _Mapping]] = ..., generations_told: _Optional[int] = ..., presentations_told: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("open_only",)
    OPEN_ONLY_FIELD_NUMBER: _ClassVar[int]
    open_only: bool
    def __init__(self, open_only: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[ClosedLoopSession]
    def __init__(self, sessions: _Optional[_Iterable[_Union[ClosedLoopSession, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ClosedLoopSession(_message.Message):
    __slots__ = ("session_id", "status", "settings", "created_time", "updated_time", "generation", "pending", "generations_told", "presentations_told", "best", "latent_dim", "natural_image_count")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_TIME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_TOLD_FIELD_NUMBER: _ClassVar[int]
    PRESENTATIONS_TOLD_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    NATURAL_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: str
    settings: CreateSessionRequest
    created_time: float
    updated_time: float
    generation: int
    pending: bool
    generations_told: int
    presentations_told: int
    best: BestSoFar
    latent_dim: int
    natural_image_count: int
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[str] = ..., settings: _Optional[_Union[CreateSessionRequest, _Mapping]] = ..., created_time: _Optional[float] = ..., updated_time: _Optional[float] = ..., generation: _Optional[int] = ..., pending: _Optional[bool] = ..., generations_told: _Optional[int] = ..., presentations_told: _Optional[int] = ..., best: _Optional[_Union[BestSoFar, _Mapping]] = ..., latent_dim: _Optional[int] = ..., natural_image_count: _Optional[int] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "format", "omit_images", "metadata")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OMIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    format: str
    omit_images: bool
    metadata: RecordingMetadata
    def __init__(self, session_id: _Optional[str] = ..., format: _Optional[str] = ..., omit_images: _Optional[bool] = ..., metadata: _Optional[_Union[RecordingMetadata, _Mapping]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "filename", "total_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    filename: str
    total_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., filename: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
