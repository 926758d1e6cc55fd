from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(_message.Message):
    __slots__ = ("kind", "neurons", "neuron_ids", "weights", "diversity_weight", "temperature")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Objective.Kind]
        SINGLE_NEURON: _ClassVar[Objective.Kind]
        WEIGHTED_POPULATION: _ClassVar[Objective.Kind]
        ONE_HOT_POPULATION: _ClassVar[Objective.Kind]
    KIND_UNSPECIFIED: Objective.Kind
    SINGLE_NEURON: Objective.Kind
    WEIGHTED_POPULATION: Objective.Kind
    ONE_HOT_POPULATION: Objective.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    NEURON_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    kind: Objective.Kind
    neurons: _containers.RepeatedScalarFieldContainer[int]
    neuron_ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    diversity_weight: float
    temperature: float
    def __init__(self, kind: _Optional[_Union[Objective.Kind, str]] = ..., neurons: _Optional[_Iterable[int]] = ..., neuron_ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., diversity_weight: _Optional[float] = ..., temperature: _Optional[float] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("model", "model_version", "generator", "generator_version", "objective", "method", "budget", "num_images", "image_size", "image_format", "seed", "preview_every", "learning_rate")
    class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        METHOD_UNSPECIFIED: _ClassVar[SynthesizeRequest.Method]
        GRADIENT: _ClassVar[SynthesizeRequest.Method]
        CMAES: _ClassVar[SynthesizeRequest.Method]
        GENETIC: _ClassVar[SynthesizeRequest.Method]
    METHOD_UNSPECIFIED: SynthesizeRequest.Method
    GRADIENT: SynthesizeRequest.Method
    CMAES: SynthesizeRequest.Method
    GENETIC: SynthesizeRequest.Method
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    generator: str
    generator_version: int
    objective: Objective
    method: SynthesizeRequest.Method
    budget: int
    num_images: int
    image_size: int
    image_format: str
    seed: int
    preview_every: int
    learning_rate: float
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ..., generator: _Optional[str] = ..., generator_version: _Optional[int] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ..., method: _Optional[_Union[SynthesizeRequest.Method, str]] = ..., budget: _Optional[int] = ..., num_images: _Optional[int] = ..., image_size: _Optional[int] = ..., image_format: _Optional[str] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class SynthesisProgress(_message.Message):
    __slots__ = ("step", "evaluations", "objective", "activation", "elapsed_seconds", "preview_images", "total_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    evaluations: int
    objective: _containers.RepeatedScalarFieldContainer[float]
    activation: _containers.RepeatedScalarFieldContainer[float]
    elapsed_seconds: float
    preview_images: _containers.RepeatedScalarFieldContainer[bytes]
    total_steps: int
    def __init__(self, step: _Optional[int] = ..., evaluations: _Optional[int] = ..., objective: _Optional[_Iterable[float]] = ..., activation: _Optional[_Iterable[float]] = ..., elapsed_seconds: _Optional[float] = ..., preview_images: _Optional[_Iterable[bytes]] = ..., total_steps: _Optional[int] = ...) -> None: ...

class SynthesizedImage(_message.Message):
    __slots__ = ("image", "latent", "rates", "activation", "activation_ratio", "objective", "reference_max")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MAX_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    latent: _containers.RepeatedScalarFieldContainer[float]
    rates: _containers.RepeatedScalarFieldContainer[float]
    activation: float
    activation_ratio: float
    objective: float
    reference_max: float
    def __init__(self, image: _Optional[bytes] = ..., latent: _Optional[_Iterable[float]] = ..., rates: _Optional[_Iterable[float]] = ..., activation: _Optional[float] = ..., activation_ratio: _Optional[float] = ..., objective: _Optional[float] = ..., reference_max: _Optional[float] = ...) -> None: ...

class SynthesisResult(_message.Message):
    __slots__ = ("images", "model_version", "generator_version", "neuron_ids", "steps", "evaluations", "elapsed_seconds", "target_neuron", "model", "generator", "queued_seconds")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEURON_IDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEURON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[SynthesizedImage]
    model_version: int
    generator_version: int
    neuron_ids: _containers.RepeatedScalarFieldContainer[str]
    steps: int
    evaluations: int
    elapsed_seconds: float
    target_neuron: int
    model: str
    generator: str
    queued_seconds: float
    def __init__(self, images: _Optional[_Iterable[_Union[SynthesizedImage, _Mapping]]] = ..., model_version: _Optional[int] = ..., generator_version: _Optional[int] = ..., neuron_ids: _Optional[_Iterable[str]] = ..., steps: _Optional[int] = ..., evaluations: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., target_neuron: _Optional[int] = ..., model: _Optional[str] = ..., generator: _Optional[str] = ..., queued_seconds: _Optional[float] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: SynthesisProgress
    result: SynthesisResult
    def __init__(self, progress: _Optional[_Union[SynthesisProgress, _Mapping]] = ..., result: _Optional[_Union[SynthesisResult, _Mapping]] = ...) -> None: ...

class ListGeneratorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GeneratorInfo(_message.Message):
    __slots__ = ("name", "versions", "architecture", "latent_dim", "resolution", "card_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    architecture: str
    latent_dim: int
    resolution: int
    card_json: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., architecture: _Optional[str] = ..., latent_dim: _Optional[int] = ..., resolution: _Optional[int] = ..., card_json: _Optional[str] = ...) -> None: ...

class ListGeneratorsResponse(_message.Message):
    __slots__ = ("generators",)
    GENERATORS_FIELD_NUMBER: _ClassVar[int]
    generators: _containers.RepeatedCompositeFieldContainer[GeneratorInfo]
    def __init__(self, generators: _Optional[_Iterable[_Union[GeneratorInfo, _Mapping]]] = ...) -> None: ...
