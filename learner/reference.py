"""The frozen reference model without a second model on the accelerator (``learner.reference=host``).

:class:`HostReference` keeps the reference weights as a state dict in host memory and, for a reference
forward pass, swaps them into the policy's own module, runs it, and swaps the policy back. The cost is two
host↔device copies of the weights per reference pass (once per batch, not per micro-batch, when called
through :meth:`PolicyLearner.ref_logprobs`); the saving is a whole model's worth of accelerator memory.

Guaranteed: the policy's parameters are bit-identical before and after a swap (restored from an exact copy,
also when the forward raises). Not supported: ZeRO-3 (parameters are partitioned; config validation refuses).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class HostReference:
    """Duck-types the parts of a frozen HF model the learner uses: ``__call__``, ``state_dict``,
    ``load_state_dict``, ``eval``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters()}

    @contextmanager
    def swapped_in(self) -> Iterator[torch.nn.Module]:
        """The policy module holding the reference weights, for the duration of the block."""
        policy = self._snapshot()
        params = dict(self.module.named_parameters())
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.state[name])
            yield self.module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(policy[name])

    def __call__(self, **kwargs):
        with self.swapped_in() as module, torch.no_grad():
            return module(**kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = False) -> None:
        for name in self.state:
            if name in state:
                self.state[name] = state[name].detach().to("cpu", copy=True)
            elif strict:
                raise KeyError(f"reference weight {name} missing from the state dict")

    def eval(self) -> "HostReference":
        return self
