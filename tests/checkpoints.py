"""Tiny randomly initialised checkpoints with tokenizers made on the spot, the same on every run (no downloads, no
weights in git)."""

from __future__ import annotations

import string
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


def bert_tokenizer():
    """A WordPiece tokenizer whose vocabulary is CORPUS's words, then characters alone and as ##pieces: a word
    outside CORPUS splits into characters (any of a-z and 0-9). Built, not trained: tokenizers' WordPieceTrainer
    picks among tied merges differently run to run, so every BERT fixture's numbers differed between two runs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in CORPUS
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({char for word in words for char in word} | set(string.ascii_lowercase + string.digits))
    vocab = [*special, *chars, *(f"##{char}" for char in chars), *(word for word in words if len(word) > 1)]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def save_checkpoint(config, tokenizer, path: Path, seed: int = 0, randomize_norms: bool = False) -> Path:
    """A randomly initialised base model for `config`, saved with safetensors weights.

    `randomize_norms`: norm weights start at 1 (or 0 for Gemma's 1 + w), which would make a QK-norm a
    no-op scale; random weights make a test notice whether q and k were taken after the norm.
    """
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if randomize_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
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


def tiny_bert(path: Path, n_layer: int = 4, n_head: int = 4, hidden: int = 64, **overrides) -> Path:
    """`overrides`: config fields (is_decoder, ...)."""
    from transformers import BertConfig

    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, intermediate_size=4 * hidden, max_position_embeddings=128,
                        initializer_range=0.2, **overrides)
    return save_checkpoint(config, tokenizer, path)


# --- issue 5: one tiny checkpoint per supported family (2 layers, small widths, initializer_range 0.2) ---

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece-style byte fallback pieces


def _trained_bpe(special: list[str], vocab_size: int, byte_level: bool) -> tuple[dict, list]:
    """(vocab, merges) of a BPE trained on CORPUS: byte-level (GPT-2 style) or metaspace with byte fallback."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if byte_level:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + BYTE_TOKENS)
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def llama_tokenizer(vocab_size: int = 512):
    """Llama/Mistral style: SentencePiece-like BPE with byte fallback that adds <s> (BOS) in front."""
    from transformers import LlamaTokenizer

    vocab, merges = _trained_bpe(["<unk>", "<s>", "</s>"], vocab_size, byte_level=False)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def gemma_tokenizer(vocab_size: int = 512):
    """Gemma style: adds <bos> in front."""
    from transformers import GemmaTokenizer

    vocab, merges = _trained_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], vocab_size, byte_level=False)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def qwen2_tokenizer(vocab_size: int = 512):
    """Qwen2/Qwen3 style: byte-level BPE, no BOS."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe(["<|endoftext|>"], vocab_size, byte_level=True)
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def neox_tokenizer(vocab_size: int = 512):
    """Pythia style: byte-level BPE, no BOS added."""
    from transformers import GPTNeoXTokenizer

    vocab, merges = _trained_bpe(["<|endoftext|>", "<|padding|>"], vocab_size, byte_level=True)
    return GPTNeoXTokenizer(vocab=vocab, merges=merges)


def roberta_tokenizer(vocab_size: int = 512):
    """RoBERTa style: byte-level BPE, <s> text </s>."""
    from transformers import RobertaTokenizer

    vocab, merges = _trained_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size, byte_level=True)
    return RobertaTokenizer(vocab=vocab, merges=merges)


def _special_ids(tokenizer) -> dict:
    return {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(tokenizer, name, None) is not None}


TINY = {"num_hidden_layers": 2, "max_position_embeddings": 128, "initializer_range": 0.2}


def tiny_roberta(path: Path) -> Path:
    from transformers import RobertaConfig

    tokenizer = roberta_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           type_vocab_size=1, **_special_ids(tokenizer), **{**TINY, "max_position_embeddings": 130})
    return save_checkpoint(config, tokenizer, path)


def tiny_distilbert(path: Path) -> Path:
    from transformers import DistilBertConfig

    tokenizer = bert_tokenizer()
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=128, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    return save_checkpoint(config, tokenizer, path)


def tiny_gpt_neox(path: Path) -> Path:
    """Pythia: rotary on the first quarter of each head's dimensions only (partial_rotary_factor 0.25)."""
    from transformers import GPTNeoXConfig

    tokenizer = neox_tokenizer()
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25},
                           bos_token_id=0, eos_token_id=0, **TINY)
    return save_checkpoint(config, tokenizer, path)


def tiny_llama(path: Path, **overrides) -> Path:
    """Grouped-query attention: 8 query heads read 2 key heads (4 each). `overrides`: config fields."""
    from transformers import LlamaConfig

    tokenizer = llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=128, **_special_ids(tokenizer), **TINY, **overrides)
    return save_checkpoint(config, tokenizer, path)


def tiny_mistral(path: Path, sliding_window: int = 8, **overrides) -> Path:
    from transformers import MistralConfig

    tokenizer = llama_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, sliding_window=sliding_window,
                           **_special_ids(tokenizer), **TINY, **overrides)
    return save_checkpoint(config, tokenizer, path)


def tiny_qwen2(path: Path, **overrides) -> Path:
    """q/k/v projections with bias, as in Qwen2. `overrides`: config fields (use_sliding_window, ...)."""
    from transformers import Qwen2Config

    tokenizer = qwen2_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, **_special_ids(tokenizer), **{**TINY, **overrides})
    return save_checkpoint(config, tokenizer, path)


def tiny_qwen3(path: Path) -> Path:
    """QK-norm (RMSNorm on each head's q and k before rotary); head_dim set apart from hidden / heads."""
    from transformers import Qwen3Config

    tokenizer = qwen2_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=128, **_special_ids(tokenizer), **TINY)
    return save_checkpoint(config, tokenizer, path, seed=0, randomize_norms=True)


def tiny_gemma2(path: Path, sliding_window: int = 6, softcap: float = 1.0,
                layer_types: tuple[str, str] = ("sliding_attention", "full_attention"), **overrides) -> Path:
    """Logit soft-capping that bites (1.0), a sliding window shorter than the test texts on the
    sliding layer (layer 0; layer 1 is global), and query_pre_attn_scalar (24) != head_dim (16).
    `overrides`: config fields (use_bidirectional_attention, is_causal, ...)."""
    from transformers import Gemma2Config

    tokenizer = gemma_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=128, query_pre_attn_scalar=24, sliding_window=sliding_window,
                          attn_logit_softcapping=softcap, layer_types=list(layer_types),
                          **_special_ids(tokenizer), **TINY, **overrides)
    return save_checkpoint(config, tokenizer, path, randomize_norms=True)
