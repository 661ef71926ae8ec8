"""Tiny random models for tests and debug configs: a BERT or XLM-R backbone from a config and a
tokenizer built locally (nothing is downloaded)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch

from raylib.model import Encoder, EncoderSettings, TextTokenizer

# A small closed vocabulary: common English words plus characters, so any ASCII text tokenizes.
_WORDS = """the of and to in is was for on that with as by it from at are be this which or an has
his her their not but were had have been one all new more can first its also after who when
two other they there some into only used most over such time may than these no between during
many year years would about made then where while being through under both city state world
water protein cell cells gene genes cancer patients disease study results data model models
method query document search retrieval embedding text language python function returns list
string number value values file files error errors class object module type true false none
red green blue cat dog house car tree river mountain music film book war king""".split()


def build_tokenizer(kind: Literal["bert", "xlm-roberta"] = "bert", model_max_length: int = 128):
    """A WordPiece tokenizer over a fixed vocabulary; XLM-R flavour uses <s>/</s> and pad id 1."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
        order = ["pad", "unk", "cls", "sep", "mask"]
    else:  # XLM-R ids: <s>=0 <pad>=1 </s>=2 <unk>=3 (the position ids depend on pad id 1)
        specials = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"}
        order = ["cls", "pad", "sep", "unk", "mask"]
    vocab: dict[str, int] = {}
    for key in order:
        vocab[specials[key]] = len(vocab)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    for piece in [*_WORDS, *chars, *("##" + c for c in string.ascii_lowercase + string.digits)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk"], max_input_chars_per_word=50))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = specials["cls"], specials["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    extra = {"bos_token": cls, "eos_token": sep} if kind == "xlm-roberta" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, unk_token=specials["unk"],
        pad_token=specials["pad"], cls_token=cls, sep_token=sep, mask_token=specials["mask"], **extra)


def tiny_text_tokenizer(arch: Literal["bert", "xlm-roberta"] = "bert", pooling: Literal["cls", "mean"] = "cls",
                        max_length: int = 64, query_prefix: str = "", document_prefix: str = "",
                        **model_only: object) -> TextTokenizer:
    """tiny_encoder's tokenizer and settings without its weights: what a tokenizing Ray Data task
    needs (12 s less per cold worker process here: no transformers model code is imported)."""
    settings = EncoderSettings(pooling=pooling, normalize=True, max_length=max_length,
                               query_prefix=query_prefix, document_prefix=document_prefix)
    return TextTokenizer(build_tokenizer(arch, model_max_length=max_length), settings)


def tiny_encoder(arch: Literal["bert", "xlm-roberta"] = "bert", hidden_size: int = 32,
                 num_layers: int = 2, num_heads: int = 2, m3_heads: bool = False,
                 pooling: Literal["cls", "mean"] = "cls", max_length: int = 64, seed: int = 0,
                 query_prefix: str = "", document_prefix: str = "") -> Encoder:
    """A random, seeded Encoder small enough to train in seconds on a CPU."""
    from transformers import AutoModel, BertConfig, XLMRobertaConfig

    torch.manual_seed(seed)
    text = tiny_text_tokenizer(arch, pooling=pooling, max_length=max_length,
                               query_prefix=query_prefix, document_prefix=document_prefix)
    tokenizer = text.tokenizer
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=hidden_size * 4,
                  pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if arch == "bert":
        config = BertConfig(max_position_embeddings=max_length + 2, **common)
    else:
        config = XLMRobertaConfig(max_position_embeddings=max_length + 4,
                                  bos_token_id=tokenizer.cls_token_id,
                                  eos_token_id=tokenizer.sep_token_id, **common)
    backbone = AutoModel.from_config(config, add_pooling_layer=False, attn_implementation="sdpa")
    encoder = Encoder(backbone, tokenizer, text.settings)
    if m3_heads:
        encoder.add_m3_heads(seed=seed)
    return encoder.eval()


def save_tiny_encoder(path: str | Path, **kwargs) -> Path:
    """Build a tiny encoder and save it as a model directory; returns the path."""
    return tiny_encoder(**kwargs).save_pretrained(path)
