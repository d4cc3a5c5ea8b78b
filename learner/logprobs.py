"""Token log-probs of a causal LM inside a :class:`learner.engine.LearnerEngine`: what the LM-type objectives
(policy, DPO, SFT/pre-training) differentiate, and what the driver's old/ref log-prob stages read.

Per-token tensors follow the alignment of :mod:`learner.batch` (position t = token t+1).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dsmath import grpo
from learner.batch import Rows

# Config attributes through which HF causal LMs post-process ``lm_head(hidden)`` (Gemma-2/3 softcapping, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier): chunked log-probs would miss them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
_warned_full_logits: set[str] = set()


def head_unsupported(module) -> str | None:
    """Why log-probs cannot come from ``module``'s final hidden states through its LM head module (None: they can).

    Checked: a separate LM head module and base model, a ``logits_to_keep`` argument (so the forward can skip the
    full logits), and no known logit post-processing in the config. :func:`probe_head` then checks numerically
    that ``head(hidden)`` is the model's own logits, which catches post-processing not listed here.
    """
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    base = getattr(module, "base_model", None)
    if head is None or base is None or base is module:
        return "it has no separate LM head module"
    if "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return "its forward takes no logits_to_keep"
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(module.config, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return f"config.{attr}={value} post-processes the logits"
    return None


@torch.no_grad()
def probe_head(module, device: torch.device) -> str | None:
    """None when ``lm_head(last hidden state)`` reproduces ``module``'s own logits exactly on a short input."""
    holder = {}
    ids = torch.arange(2, 10, device=device)[None] % module.config.vocab_size  # [1, 8]

    def grab(_m, _args, out):
        holder["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [1, 8, H]

    handle = module.base_model.register_forward_hook(grab)
    was_training = module.training
    try:
        module.eval()
        logits = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # [1, 8, V]
        mine = module.get_output_embeddings()(holder["hidden"])  # [1, 8, V]
    finally:
        handle.remove()
        module.train(was_training)
    if mine.shape != logits.shape or not torch.equal(mine.float(), logits.float()):
        return "its logits are not lm_head(last hidden state) (post-processed)"
    return None


@contextmanager
def _hidden_state_head(module, labels: torch.Tensor, chunk_tokens: int, with_entropy: bool):
    """While active, a forward of ``module`` (a causal LM, called directly or through its DeepSpeed engine) also
    returns ``token_logprobs`` (and ``token_entropy``) ``[n, w-1]``: :func:`dsmath.grpo.head_token_logprobs` on the
    base model's last hidden state. Computed inside the module's forward, so DeepSpeed's output hooks (which start
    its backward bookkeeping) see them."""
    head, holder = module.get_output_embeddings(), {}

    def grab(_m, _args, out):
        holder["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [n, w, H]

    def attach(_m, _args, out):
        hidden = holder.pop("hidden")  # [n, w, H]
        lp, ent = grpo.head_token_logprobs(hidden[:, :-1], head, labels, chunk_tokens, with_entropy=with_entropy)
        out["token_logprobs"] = lp  # [n, w-1]
        if ent is not None:
            out["token_entropy"] = ent  # [n, w-1]
        return out

    handles = [module.base_model.register_forward_hook(grab), module.register_forward_hook(attach)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TokenLogprobs:
    """Token log-probs of micro-batches under the engine's model or its reference, float32 in either precision.

    With ``learner.logprob_chunk_tokens`` > 0 they come from the final hidden states through the LM head that many
    tokens at a time (no ``[n, w, V]`` logits kept) — where the model allows it (:func:`head_unsupported`, then
    :func:`probe_head`); otherwise a one-time warning and the full logits. Building one runs the probe (a no-grad
    eval forward: no RNG use).
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.device = engine.device
        self.chunk_tokens = int(getattr(engine.cfg, "logprob_chunk_tokens", 0) or 0)
        if self.chunk_tokens:
            reason = head_unsupported(engine.module) or probe_head(engine.module, self.device)
            if reason:
                name = type(engine.module).__name__
                if name not in _warned_full_logits:
                    _warned_full_logits.add(name)
                    warnings.warn(f"learner.logprob_chunk_tokens: {name}: {reason}; using the full logits",
                                  stacklevel=3)
                self.chunk_tokens = 0

    def __call__(self, model, mb: Rows, *, with_entropy: bool = False):
        """``(logprobs [n, w], entropy [n, w] detached or None)`` of ``mb`` under ``model`` (the DeepSpeed engine
        or a frozen module); position t = log p(token t+1), the last column 0."""
        mb = mb.to(self.device)
        if self.chunk_tokens:
            module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
            keep = torch.zeros(0, dtype=torch.long, device=self.device)  # the forward's own logits: none
            with _hidden_state_head(module, mb.input_ids[:, 1:], self.chunk_tokens, with_entropy):
                out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                            logits_to_keep=keep)
            lp = F.pad(out["token_logprobs"], (0, 1))  # [n, w] position t = log p(token t+1)
            ent = F.pad(out["token_entropy"].detach(), (0, 1)) if with_entropy else None  # [n, w]
            return lp, ent
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits  # [n, w, V]
        lp = grpo.token_logprobs(logits[:, :-1], mb.input_ids[:, 1:])  # [n, w-1]
        lp = F.pad(lp, (0, 1))  # [n, w] position t = log p(token t+1)
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = F.pad(grpo.entropy(logits[:, :-1].detach()), (0, 1))  # [n, w]
        return lp, ent

    @torch.no_grad()
    def batched(self, model, batch: Rows) -> torch.Tensor:
        """Log-probs ``[N, T]`` of the whole ``batch`` (micro-batched, no gradients; padding positions hold junk —
        mask them). A host-memory reference is swapped in once for the whole batch."""
        from learner.reference import HostReference

        if isinstance(model, HostReference):
            with model.swapped_in() as module:
                return self.batched(module, batch)
        return self.engine.per_position(model, batch, lambda m, mb: self(m, mb)[0])
