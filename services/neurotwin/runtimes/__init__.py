"""Runtimes: things that compute (ONNX Runtime sessions, torch twins, generators)."""
