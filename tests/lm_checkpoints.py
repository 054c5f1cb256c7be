"""Tiny random checkpoints saved WITH their language-model head (the ablation's loss needs it), no downloads."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import bert_tokenizer, gpt2_tokenizer


def _save_lm(auto_class, config, tokenizer, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    auto_class.from_config(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_gpt2_lm(path: Path, seed: int = 0, n_layer: int = 3, n_head: int = 4, n_embd: int = 32,
                 vocab_size: int = 512) -> Path:
    """GPT2LMHeadModel; the same tokenizer for every seed (the tokenizer is trained deterministically)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = gpt2_tokenizer(vocab_size)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        initializer_range=0.2)
    return _save_lm(AutoModelForCausalLM, config, tokenizer, path, seed)


def tiny_bert_mlm(path: Path, seed: int = 0, n_layer: int = 2, n_head: int = 4, hidden: int = 32) -> Path:
    """BertForMaskedLM with its prediction head saved."""
    from transformers import AutoModelForMaskedLM, BertConfig

    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, intermediate_size=4 * hidden, max_position_embeddings=128,
                        initializer_range=0.2)
    return _save_lm(AutoModelForMaskedLM, config, tokenizer, path, seed)


def float16_overflow_lm(path: Path, scale: float, seed: int = 0) -> Path:
    """tiny_gpt2_lm with its final LayerNorm's weight multiplied by `scale`: in float16 its logits pass float16's
    largest number (65504), as a real model's can, so its next-token loss is inf or NaN (for some heads, or all)."""
    from transformers import AutoModelForCausalLM

    tiny_gpt2_lm(path, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(scale)
    model.save_pretrained(path, safe_serialization=True)
    return path
