"""The frozen reference model without a second model on the accelerator (``learner.reference=host``).

:class:`HostReference` keeps the reference weights as a state dict in host memory and, for a reference
forward pass, swaps them into the policy's own module, runs it, and swaps the policy back. The cost is two
host↔device copies of the weights per reference pass (once per batch, not per micro-batch, when called
through :meth:`PolicyLearner.ref_logprobs`); the saving is a whole model's worth of accelerator memory.

What it is for: a learner whose device cannot hold a second copy of the weights (the reference would otherwise
cost as much as the policy's bf16/fp32 weights). It trades memory for time — it is never faster than
``reference=copy``, which is the setting to use whenever the copy fits (with β = 0 no reference is built at all).
On a CUDA device both host copies (the reference weights and the policy's weights while the reference is swapped
in) live in pinned (page-locked) buffers allocated once, and every copy is ``non_blocking`` on the current
stream, so the transfers run at full PCIe/NVLink-C2C bandwidth and queue behind/ahead of the forward pass without
host synchronisation. Under ``learner.precision=bf16`` the copies are bf16 (half the bytes of fp32).

Guaranteed: the policy's parameters are bit-identical before and after a swap (restored from an exact copy,
also when the forward raises). Not supported: ZeRO-3 (parameters are partitioned; config validation refuses —
a ZeRO-3 learner shards its reference copy over the ranks instead).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    """An empty host tensor shaped like ``t``: pinned when ``t`` lives on a CUDA device (async copies)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")


class HostReference:
    """Duck-types the parts of a frozen HF model the learner uses: ``__call__``, ``state_dict``,
    ``load_state_dict``, ``eval``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        params = dict(module.named_parameters())
        self.state = {n: _host_buffer(p) for n, p in params.items()}  # the reference weights
        self._policy = {n: _host_buffer(p) for n, p in params.items()}  # the policy's, while swapped out
        self._copy(params, self.state)

    def _on_cuda(self) -> bool:
        return any(p.device.type == "cuda" for p in self.module.parameters())

    def _sync(self) -> None:
        """Wait for queued copies before host code reads or writes the host buffers."""
        if self._on_cuda():
            torch.cuda.current_stream().synchronize()

    @staticmethod
    @torch.no_grad()
    def _copy(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
        for name, t in src.items():
            dst[name].copy_(t.detach(), non_blocking=True)

    @contextmanager
    def swapped_in(self) -> Iterator[torch.nn.Module]:
        """The policy module holding the reference weights, for the duration of the block."""
        params = dict(self.module.named_parameters())
        # Same stream throughout: device→host (policy out), host→device (reference in), the forward, then the
        # policy back in — ordered by the stream, no host synchronisation in between.
        self._copy(params, self._policy)
        try:
            self._copy(self.state, params)
            yield self.module
        finally:
            self._copy(self._policy, params)
            self._sync()  # the policy is back before anyone (an optimizer step, a checkpoint) reads it

    def __call__(self, **kwargs):
        with self.swapped_in() as module, torch.no_grad():
            return module(**kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._sync()
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = False) -> None:
        self._sync()  # no queued copy still reads the buffers we overwrite
        for name in self.state:
            if name in state:
                self.state[name].copy_(state[name].detach())
            elif strict:
                raise KeyError(f"reference weight {name} missing from the state dict")

    def eval(self) -> "HostReference":
        return self
