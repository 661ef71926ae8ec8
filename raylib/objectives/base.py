"""The training loop's extension point: how one batch of rows becomes a loss.

The loop (raylib.ray_train.loop) owns the model, optimizer, schedule, gradient cache, checkpoints,
metrics. An Objective owns tokenization, which heads to run, and the loss: pretraining uses
raylib.objectives.contrastive, finetuning (hard negatives, M3 heads, self-distillation)
raylib.objectives.finetune. Objectives are plain PyTorch (no Ray) and double as their job's config
section.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from raylib.model import Encoder, pad_ids

Features = dict[str, dict[str, torch.Tensor]]  # {side: {"input_ids": [b, L], "attention_mask": [b, L]}}
Reps = dict[str, dict[str, torch.Tensor]]      # {side: {"dense": [b, H], ...}}


@runtime_checkable
class Objective(Protocol):
    """How a batch becomes a loss. The loop owns model, optimizer, schedule, grad cache, checkpoints.

    Contract (what the loop relies on):
    - `features(encoder, rows)`: `encoder` is the unwrapped Encoder (has .tokenize); `rows` is THIS
      worker's share of one global batch, {column: list} (every column of the Parquet input, incl.
      `source`, `language`). Returns {side: {"input_ids": [n_side, L], "attention_mask": [n_side, L]}};
      the rows of a side may be more than the batch rows (finetune: 1 positive + n negatives per query
      flattened). Each side is padded to one length (tokenize the whole side at once). Rows of
      prepared data (raylib.jobs.prepare) carry token ids instead (`<column>_ids`): both paths pad
      through `pad_tokens`, so the same rows give the same features either way.
    - `embed(model, side, features)`: `model` is callable like Encoder.forward (it may be the DDP
      wrapper: call it, don't call its methods). `features` is a row chunk of one side (gradient
      caching calls it on chunks, twice: once without grad, once with grad and the same RNG state).
      Returns {name: tensor [chunk, ...]}; float tensors get gradients, others (masks) pass through.
    - `loss(reps, features, rows)`: reps of the full local batch per side, concatenated over chunks.
      Returns (scalar loss, {metric: float}). Cross-worker gathers happen in here: every rank calls
      loss exactly once per step. The loss is this rank's mean; the loop averages gradients over ranks
      (DDP), so the loss should be the global loss restricted to this rank's queries.
    - `query_max_length`, `document_max_length`: token caps; the prepare stage tokenizes with them and
      the loop checks that prepared data was made with them (raylib.training.check_prepared).
    Optional attributes, read with getattr/hasattr (absent means the default):
    - `num_negatives: int`: the objective trains on mined rows (query, positive, negatives); absent:
      on pairs. The prepare stage and check_prepared take the kind of rows from it.
    - `pad_across_workers: bool` (default False): when True the loop pads each side to the longest
      length over all workers, so gathered per-token reps (multi-vector) line up.
    - `find_unused_parameters: bool` (default: the model has M3 heads): DDP's flag, for an objective
      that leaves some heads of the model unused.
    - `begin_step(step)`: called with the 0-based optimizer step about to run, before `features`
      (the M3 warm-up turns self-distillation on by it).
    """

    query_max_length: int
    document_max_length: int

    def features(self, model: Encoder, rows: dict[str, list]) -> Features: ...

    def embed(self, model: Any, side: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, reps: Reps, features: Features, rows: dict[str, list]) -> tuple[torch.Tensor, dict[str, float]]: ...


def pad_tokens(model: Encoder, ids: list) -> dict[str, torch.Tensor]:
    """Unpadded token id rows -> one side's padded features (the model's pad id and side): the one
    padding step of both the tokenize-then-pad and the pre-tokenized paths."""
    input_ids, mask = pad_ids(ids, model.tokenizer.pad_token_id, model.tokenizer.padding_side)
    return {"input_ids": input_ids, "attention_mask": mask}


def side_ids(model: Encoder, rows: dict[str, list], column: str, kind: str, max_length: int) -> list:
    """A side's token id rows: the prepared `<column>_ids`, else the texts of `column` tokenized
    (prefix, truncation to max_length) without padding."""
    if f"{column}_ids" in rows:
        return list(rows[f"{column}_ids"])
    if column not in rows:
        raise ValueError(f"rows need a {column!r} (or {column + '_ids'!r}) column; got {sorted(rows)}")
    return model.tokenize(list(rows[column]), kind, max_length, padding=False)["input_ids"]
