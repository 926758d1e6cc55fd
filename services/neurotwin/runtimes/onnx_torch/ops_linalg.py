"""Linear algebra: MatMul, Gemm, Einsum."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Node, align, optional, register_op


@register_op("MatMul")
def _matmul(node: Node, xs: list[Tensor | None]) -> Tensor:
    a, b = align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.matmul(a, b)


@register_op("Gemm")
def _gemm(node: Node, xs: list[Tensor | None]) -> Tensor:
    a, b = align(xs[0], xs[1])  # type: ignore[arg-type]
    if int(node.attr("transA", 0)):
        a = a.t()
    if int(node.attr("transB", 0)):
        b = b.t()
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    c = optional(xs, 2)
    if c is None or c.numel() == 0:
        out = a @ b
        return out if alpha == 1.0 else alpha * out
    c = c.to(a.device)
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


@register_op("Einsum")
def _einsum(node: Node, xs: list[Tensor | None]) -> Tensor:
    return torch.einsum(str(node.attr("equation")), *align(*[x for x in xs if x is not None]))
