"""Python clients for the neurotwin gRPC services.

``ChannelConfig`` holds the connection settings (address, TLS/mTLS, bearer token, message size) that
every client here takes; failed calls raise ``neurotwin.errors`` exceptions carrying the gRPC code.
"""

from neurotwin.client._channel import DEFAULT_ADDRESS, ChannelConfig, translate_error
from neurotwin.client.predictor import (
    AsyncPredictorClient,
    ModelDetails,
    ModelInfo,
    Prediction,
    PredictorClient,
    VersionInfo,
)
from neurotwin.errors import RemoteError

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncPredictorClient",
    "ChannelConfig",
    "ModelDetails",
    "ModelInfo",
    "Prediction",
    "PredictorClient",
    "RemoteError",
    "VersionInfo",
    "translate_error",
]
