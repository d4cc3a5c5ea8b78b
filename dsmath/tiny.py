"""Tiny Qwen2-architecture models and locally trained BPE tokenizers (no hub downloads).

The tokenizer uses Qwen2's own pre-tokenizer split (digits one at a time) plus ByteLevel, because
transformers swaps Qwen2's pre-tokenizer in when it loads a ``qwen2`` model folder: a tokenizer
trained any other way would encode differently after a save/load round trip.

Guaranteed: ``len(tokenizer) == model.config.vocab_size``, and the saved folder loads with
``AutoTokenizer``/``AutoModelForCausalLM`` and with vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dsmath.config import ModelConfig

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE with exactly ``vocab_size`` entries (specials included)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=4096
    )
    if len(fast) != vocab_size:
        # BPE stops early when the corpus has fewer merges to offer; pad the vocab so sizes agree.
        fast.add_tokens([f"<|unused{i}|>" for i in range(vocab_size - len(fast))], special_tokens=True)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_model(cfg: ModelConfig, tokenizer, *, seed: int = 0):
    """A freshly initialised Qwen2ForCausalLM shaped by ``cfg`` for ``tokenizer``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(hf_cfg)
    return model


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
