"""Engines: batching, model lifecycle, synthesis, optimizers, closed-loop sessions (no gRPC here)."""
