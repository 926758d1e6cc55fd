"""neurotwin: digital twins of visual neurons, served over gRPC."""

__version__ = "0.1.0"
