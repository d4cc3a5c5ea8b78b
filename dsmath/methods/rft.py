"""RFT (paper Table 10): online RFT's coefficient I(o), on samples drawn once from the starting (SFT) policy."""

from __future__ import annotations

from dsmath.methods.base import Method
from dsmath.methods.online_rft import correctness, no_kl


def check(cfg) -> str | None:
    if cfg.algorithm.sampling == "online":
        return ("algorithm.sampling: rft trains on samples drawn once from the starting policy; use "
                "algorithm.name=online_rft for online sampling")
    return no_kl(cfg)


METHOD = Method(name="rft", sampling="offline", advantages=correctness, kl="none", check=check)
