"""Tiny randomly initialised checkpoints with tokenizers trained on the spot (no downloads, no weights in git)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The majority of Fiji's islands were formed by volcanic activity starting around 150 million years ago.",
    "Some geothermal activity still occurs today on the islands of Vanua Levu and Taveuni.",
    "The cat sat on the mat. The cat sat on the mat again, and the dog watched the cat.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Attention heads read keys with queries; some heads attend to the previous token.",
    "Mary and John went to the store. John gave a drink to Mary.",
] * 20


def _byte_level_tokenizer(vocab_size: int, bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>"] + ([bos] if bos and bos != "<|endoftext|>" else [])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def gpt2_tokenizer(vocab_size: int = 512):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=_byte_level_tokenizer(vocab_size), bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def bert_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def save_checkpoint(config, tokenizer, path: Path, seed: int = 0) -> Path:
    """A randomly initialised base model for `config`, saved with safetensors weights."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_gpt2(path: Path, n_layer: int = 8, n_head: int = 12, n_embd: int = 96, **overrides) -> Path:
    """initializer_range 0.2 (not 0.02) so that random heads attend sharply rather than uniformly."""
    from transformers import GPT2Config

    tokenizer = gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        **{"initializer_range": 0.2, **overrides})
    return save_checkpoint(config, tokenizer, path)


def tiny_bert(path: Path, n_layer: int = 4, n_head: int = 4, hidden: int = 64) -> Path:
    from transformers import BertConfig

    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, intermediate_size=4 * hidden, max_position_embeddings=128,
                        initializer_range=0.2)
    return save_checkpoint(config, tokenizer, path)
