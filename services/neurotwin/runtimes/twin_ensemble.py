"""Several differentiable twins of the same neurons used as one: member rates ``[N, M, K]``.

Synthesis objectives that need the members to agree (``neurotwin.engines.objectives.Agreement``) read
every member's rates; everything reported (activations, result rates) is the members' mean. Members
must take the same input size and predict the same neurons in the same order; they may differ in
anything else (seed, split, core, readout), which is the point: an image that drives them all is less
likely to exploit one model's quirks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neurotwin.errors import InvalidInput

__all__ = ["TwinEnsemble"]


class TwinEnsemble(nn.Module):
    """Twins (modules with ``forward_chw01``, e.g. ``OnnxTorchModule``) stacked along a member axis."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise InvalidInput("twin ensemble: no members")
        sizes = {(getattr(m, "input_height", None), getattr(m, "input_width", None)) for m in members}
        if len(sizes) > 1:
            raise InvalidInput(f"twin ensemble: members take different input sizes {sorted(sizes, key=str)}")
        missing = [i for i, m in enumerate(members) if not callable(getattr(m, "forward_chw01", None))]
        if missing:
            raise InvalidInput(f"twin ensemble: members {missing} have no forward_chw01")
        self.members = nn.ModuleList(members)
        self.input_height, self.input_width = next(iter(sizes))

    def __len__(self) -> int:
        return len(self.members)

    def forward_chw01(self, images: Tensor, resize: bool = True) -> Tensor:
        """Float [N, 3, H, W] in [0, 1] -> member rates [N, M, K]."""
        outputs = [member.forward_chw01(images, resize=resize) for member in self.members]
        counts = {o.shape[-1] for o in outputs}
        if len(counts) > 1:
            raise InvalidInput(f"twin ensemble: members predict different neuron counts {sorted(counts)}")
        return torch.stack(outputs, dim=1)
