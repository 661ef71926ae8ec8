"""A model directory's files, written (no model code): the HF backbone and tokenizer, BGE-M3's head
files, raylib_settings.json and the sentence-transformers modules, so sentence-transformers and
FlagEmbedding load the directory unchanged. raylib.model.Encoder.save_pretrained and
raylib.convert (which writes the converted me5-small) both write through `write_model_dir`;
raylib.model reads these files back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SETTINGS_FILE = "raylib_settings.json"
COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"


def write_sentence_transformers_files(path: Path, normalize: bool) -> None:
    """Write modules.json + 1_Pooling (+ 2_Normalize) so sentence-transformers loads the dir."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)


def write_model_dir(path: Path, backbone: Any, tokenizer: Any, settings: dict[str, Any], hidden_size: int,
                    sparse_linear: torch.nn.Module | None = None,
                    colbert_linear: torch.nn.Module | None = None) -> Path:
    """Write an HF dir + BGE-M3 head files + sentence-transformers modules + our settings
    (`settings`: the fields of raylib.model.EncoderSettings)."""
    path.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    if sparse_linear is not None:
        torch.save({k: v.detach().cpu() for k, v in sparse_linear.state_dict().items()}, path / SPARSE_FILE)
    if colbert_linear is not None:
        torch.save({k: v.detach().cpu() for k, v in colbert_linear.state_dict().items()}, path / COLBERT_FILE)
    (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    write_sentence_transformers_files(path, settings["normalize"])
    pooling = {"word_embedding_dimension": hidden_size,
               "pooling_mode_cls_token": settings["pooling"] == "cls",
               "pooling_mode_mean_tokens": settings["pooling"] == "mean",
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": settings["max_length"], "do_lower_case": False}))
    prompts = {"query": settings["query_prefix"], "document": settings["document_prefix"]}
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return path
