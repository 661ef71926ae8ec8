"""The one encoder class shared by Ray Data actors, Ray Train workers and Ray Serve replicas.

A Hugging Face encoder backbone (BERT, XLM-R, ...) plus BGE-M3's optional heads (M3 §3.2):
dense = pooled hidden state, sparse = ReLU(W_lex h_i) per token, multi-vector = normalize(W_mul h_i)
over the tokens after CLS. Plain PyTorch: no Ray import here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raylib.encoding import BatchEncoder, check_texts, pad_rows
from raylib.model_files import COLBERT_FILE, SETTINGS_FILE, SPARSE_FILE, write_model_dir
from raylib.registry import resolve_model_path

logger = logging.getLogger(__name__)

Kind = Literal["query", "document"]


@dataclass
class EncoderSettings:
    """Our own per-model settings, saved as raylib_settings.json beside the HF files."""

    pooling: Literal["cls", "mean"] = "cls"
    normalize: bool = True
    query_prefix: str = ""
    document_prefix: str = ""
    max_length: int = 512
    matryoshka_dims: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, path: Path) -> "EncoderSettings":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**data)


def _settings_from_sentence_transformers(path: Path) -> EncoderSettings:
    """Read pooling, normalization, max length and prompts from a sentence-transformers dir."""
    modules = json.loads((path / "modules.json").read_text())
    settings = EncoderSettings(pooling="mean", normalize=False)
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = json.loads((path / module["path"] / "config.json").read_text())
            mode = pooling.get("pooling_mode")  # sentence-transformers >= 6 writes one key
            if pooling.get("pooling_mode_cls_token") or mode == "cls":
                settings.pooling = "cls"
            elif pooling.get("pooling_mode_mean_tokens") or mode == "mean":
                settings.pooling = "mean"
            else:
                raise ValueError(f"{path}: unsupported pooling {pooling}")
        elif kind == "Normalize":
            settings.normalize = True
    st_config = path / "sentence_bert_config.json"
    st_max = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
    tok_config = path / "tokenizer_config.json"  # sentence-transformers >= 6 keeps it there
    if st_max is None and tok_config.exists():
        limit = json.loads(tok_config.read_text()).get("model_max_length")
        st_max = limit if isinstance(limit, int) and 0 < limit < settings.max_length else None
    if st_max is not None:
        settings.max_length = int(st_max)
    prompts_file = path / "config_sentence_transformers.json"
    if prompts_file.exists():
        prompts = json.loads(prompts_file.read_text()).get("prompts") or {}
        settings.query_prefix = prompts.get("query", "")
        settings.document_prefix = prompts.get("document", prompts.get("passage", ""))
    return settings


@dataclass(frozen=True)
class ModelSpec:
    """A model and how to load it: a name or directory, whether its own code may run, and
    settings that override (or, for a plain HF directory, supply) its pooling and prefixes.

    None takes the value from the directory (raylib_settings.json, sentence-transformers
    files) or, for a plain HF directory, the defaults: CLS pooling, normalized, no prefixes."""

    name_or_path: str
    trust_remote_code: bool = False
    pooling: Literal["cls", "mean"] | None = None
    normalize: bool | None = None
    max_length: int | None = None
    query_prefix: str | None = None
    document_prefix: str | None = None

    def __post_init__(self) -> None:
        if not str(self.name_or_path):
            raise ValueError("model name_or_path is empty")
        if self.pooling not in (None, "cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @classmethod
    def of(cls, model: "str | os.PathLike | ModelSpec", **overrides: Any) -> "ModelSpec":
        """A spec from a name, a path or a spec, with the non-None `overrides` applied."""
        spec = model if isinstance(model, ModelSpec) else cls(str(model))
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(spec, **changes) if changes else spec

    def settings_overrides(self) -> dict[str, Any]:
        """The EncoderSettings fields this spec sets (the non-None ones)."""
        names = ("pooling", "normalize", "max_length", "query_prefix", "document_prefix")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}



def _is_plain_hf_dir(path: Path) -> bool:
    """No raylib settings, no sentence-transformers modules and no BGE-M3 heads (CLS is BGE-M3's)."""
    return not any((path / f).exists() for f in (SETTINGS_FILE, "modules.json", SPARSE_FILE,
                                                 COLBERT_FILE))


def load_settings(path: Path, spec: ModelSpec, tokenizer: Any = None) -> EncoderSettings:
    """The directory's settings with the spec's overrides; warns when a plain HF directory gives
    no pooling (CLS would be used silently, wrong for mean-pooled models such as e5)."""
    if (path / SETTINGS_FILE).exists():
        settings = EncoderSettings.from_json(path / SETTINGS_FILE)
    elif (path / "modules.json").exists():
        settings = _settings_from_sentence_transformers(path)
    else:  # plain HF dir or BGE-M3 layout: CLS pooling, normalized (as BGE-M3 dense)
        settings = EncoderSettings()
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < settings.max_length:
            settings.max_length = limit  # never past what the tokenizer (and model) declare
        if spec.pooling is None and _is_plain_hf_dir(path):
            logger.warning(
                "%s is a plain Hugging Face directory with no pooling information (no %s, no "
                "sentence-transformers modules.json): using CLS pooling, normalize=True and no "
                "query/document prefixes. If its authors meant otherwise (e5: mean pooling, "
                "'query: '/'passage: '), set pooling and the prefixes in the model spec.",
                path, SETTINGS_FILE)
    return dataclasses.replace(settings, **spec.settings_overrides())


def _remote_code_hint(error: Exception, spec: ModelSpec) -> ValueError:
    return ValueError(f"model {spec.name_or_path!r} ships its own modeling code and cannot load "
                      f"without trust_remote_code: set trust_remote_code: true in its model spec "
                      f"(only for code you trust). ({error})")


def load_tokenizer(path: Path, spec: ModelSpec) -> Any:
    """AutoTokenizer for `path`, running the directory's own code only if the spec trusts it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not spec.trust_remote_code:
            raise _remote_code_hint(e, spec) from e
        raise


class _PoolerOnlyReport(logging.Filter):
    """Drops transformers' load report when its only finding is the pooler we leave out on purpose
    (add_pooling_layer=False: pooling is ours); any other finding is logged as usual. Without it
    every embedding actor and replica start prints the same 9-line report for minilm."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.strip() for line in message.splitlines() if "|" in line and "Status" not in line
                and not line.strip().startswith("-")]
        return not rows or not all(r.startswith("pooler.") and "UNEXPECTED" in r for r in rows)


logging.getLogger("transformers.modeling_utils").addFilter(_PoolerOnlyReport())


def load_backbone(path: Path, spec: ModelSpec, attn_implementation: str) -> nn.Module:
    """AutoModel without its pooler; remote code only if trusted."""
    from transformers import AutoModel

    kwargs = dict(attn_implementation=attn_implementation, trust_remote_code=spec.trust_remote_code)
    try:
        return AutoModel.from_pretrained(str(path), add_pooling_layer=False, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not spec.trust_remote_code:
            raise _remote_code_hint(e, spec) from e
        raise
    except TypeError as e:  # a remote-code model without BERT's add_pooling_layer argument
        if "add_pooling_layer" not in str(e):
            raise
        return AutoModel.from_pretrained(str(path), **kwargs)


class TextTokenizer:
    """The model's tokenizer with its prefixes and max length: texts -> token ids, no weights.

    Shared by Encoder.tokenize and the CPU tasks that tokenize upstream of embedding actors."""

    def __init__(self, tokenizer: Any, settings: EncoderSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self._warned_truncation = False

    @classmethod
    def from_pretrained(cls, model: "str | os.PathLike | ModelSpec", **overrides: Any) -> "TextTokenizer":
        """Load only the tokenizer and settings of `model` (a name, a dir or a ModelSpec)."""
        spec = ModelSpec.of(model, **overrides)
        path = resolve_model_path(spec.name_or_path)
        tokenizer = load_tokenizer(path, spec)
        return cls(tokenizer, load_settings(path, spec, tokenizer))

    def prefix(self, kind: Kind) -> str:
        if kind not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        return self.settings.query_prefix if kind == "query" else self.settings.document_prefix

    def __call__(self, texts: Sequence[str], kind: Kind = "document", max_length: int | None = None,
                 padding: bool = True) -> dict[str, Any]:
        """Prefix, tokenize and truncate to max_length (warned once when it cuts text)."""
        texts = check_texts(texts)
        max_length = max_length or self.settings.max_length
        prefix = self.prefix(kind)
        batch = self.tokenizer([prefix + t for t in texts], max_length=max_length, truncation=True,
                               padding=padding, return_tensors="pt" if padding else None,
                               return_overflowing_tokens=False, return_length=not padding)
        if not self._warned_truncation:
            lengths = batch["attention_mask"].sum(1) if padding else torch.tensor(batch["length"])
            if int(lengths.max()) >= max_length:
                self._warned_truncation = True
                logger.warning("texts longer than max_length=%d tokens are truncated "
                               "(warned once)", max_length)
        return {k: batch[k] for k in ("input_ids", "attention_mask")}


def pad_ids(ids: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """`raylib.encoding.pad_rows` as torch tensors (the training batches' padding)."""
    input_ids, mask = pad_rows(ids, pad_id, side)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


class Encoder(nn.Module, BatchEncoder):
    """Backbone + pooling + optional sparse and multi-vector heads; trains, and encodes as the
    torch backend of `raylib.encoding.BatchEncoder`'s loop."""

    backend = "torch"

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: EncoderSettings | None = None,
                 sparse_linear: nn.Linear | None = None, colbert_linear: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings or EncoderSettings()
        self.sparse_linear = sparse_linear
        self.colbert_linear = colbert_linear
        self.text_tokenizer = TextTokenizer(tokenizer, self.settings)

    # ----------------------------------------------------------------- construction
    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    @property
    def dim(self) -> int:
        """Dense embedding dimension."""
        return self.hidden_size

    @property
    def has_sparse(self) -> bool:
        return self.sparse_linear is not None

    @property
    def has_multivector(self) -> bool:
        return self.colbert_linear is not None

    @property
    def multivector_dim(self) -> int | None:
        return self.colbert_linear.out_features if self.colbert_linear is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def add_m3_heads(self, colbert_dim: int | None = None, seed: int | None = None) -> "Encoder":
        """Attach fresh sparse and multi-vector heads (M3 §3.2), initialized like nn.Linear."""
        if seed is not None:
            torch.manual_seed(seed)
        ref = next(self.backbone.parameters())
        self.sparse_linear = nn.Linear(self.hidden_size, 1).to(ref.device)
        self.colbert_linear = nn.Linear(self.hidden_size, colbert_dim or self.hidden_size).to(ref.device)
        return self

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | ModelSpec,
                        device: str | torch.device | None = None, attn_implementation: str = "sdpa",
                        trust_remote_code: bool | None = None, **overrides: Any) -> "Encoder":
        """Load a raylib, BGE-M3, sentence-transformers or plain HF dir, or a known name.

        `model` may be a ModelSpec; `trust_remote_code` and `overrides` (pooling, normalize,
        max_length, query_prefix, document_prefix) replace the spec's fields when not None."""
        spec = ModelSpec.of(model, trust_remote_code=trust_remote_code, **overrides)
        path = resolve_model_path(spec.name_or_path)
        tokenizer = load_tokenizer(path, spec)
        settings = load_settings(path, spec, tokenizer)
        backbone = load_backbone(path, spec, attn_implementation)
        hidden = backbone.config.hidden_size
        sparse_linear = colbert_linear = None
        if (path / SPARSE_FILE).exists():
            state = torch.load(path / SPARSE_FILE, map_location="cpu", weights_only=True)
            sparse_linear = nn.Linear(hidden, state["weight"].shape[0])
            sparse_linear.load_state_dict(state)
        if (path / COLBERT_FILE).exists():
            state = torch.load(path / COLBERT_FILE, map_location="cpu", weights_only=True)
            colbert_linear = nn.Linear(hidden, state["weight"].shape[0])
            colbert_linear.load_state_dict(state)
        model = cls(backbone, tokenizer, settings, sparse_linear, colbert_linear)
        model.eval()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write an HF dir + BGE-M3 head files + sentence-transformers modules + our settings."""
        backbone = getattr(self.backbone, "module", self.backbone)
        return write_model_dir(Path(path), backbone, self.tokenizer, dataclasses.asdict(self.settings),
                               self.hidden_size, self.sparse_linear, self.colbert_linear)

    # ----------------------------------------------------------------- tokenization
    def tokenize(self, texts: Sequence[str], kind: Kind = "document", max_length: int | None = None,
                 padding: bool = True) -> dict[str, torch.Tensor]:
        """Prefix, tokenize and truncate to max_length (warned once when it cuts text)."""
        self.text_tokenizer.settings = self.settings  # one settings object, even if replaced
        return self.text_tokenizer(texts, kind, max_length, padding)

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, dense: bool = True,
                sparse: bool = False, multivector: bool = False) -> dict[str, torch.Tensor]:
        """Training/inference forward on a padded batch.

        Returns (only what is asked):
          dense:       [B, H] pooled, L2-normalized if settings.normalize
          sparse:      [B, L] ReLU(W_lex h_i) per token (0 on padding and special tokens)
          multivector: [B, L-1, H'] normalize(W_mul h_i) for tokens after CLS, 0 on padding
          mask:        [B, L] the attention mask
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out: dict[str, torch.Tensor] = {"mask": attention_mask}
        if dense:
            out["dense"] = self.pool(hidden, attention_mask)
        if sparse:
            if self.sparse_linear is None:
                raise ValueError("this model has no sparse head (add_m3_heads() adds one)")
            weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)  # [B, L]
            keep = attention_mask.bool() & ~torch.isin(
                input_ids, torch.from_numpy(self.special_token_ids).to(input_ids.device))
            out["sparse"] = weights * keep
        if multivector:
            if self.colbert_linear is None:
                raise ValueError("this model has no multi-vector head (add_m3_heads() adds one)")
            vecs = self.colbert_linear(hidden[:, 1:])  # [B, L-1, H']
            vecs = vecs * attention_mask[:, 1:, None].to(vecs.dtype)
            out["multivector"] = F.normalize(vecs, dim=-1)
        return out

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, H] by CLS or masked mean, normalized if configured."""
        if self.settings.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.settings.normalize else pooled

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def encode_features(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """BatchEncoder.encode_features in eval mode without autograd (train mode restored)."""
        was_training = self.training
        self.eval()
        try:
            return super().encode_features(*args, **kwargs)
        finally:
            self.train(was_training)

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, dense: bool, sparse: bool,
                 multivector: bool, cls_flags: np.ndarray | None) -> dict[str, np.ndarray]:
        """One padded batch through the model on its device: float32 NumPy outputs per head."""
        ids, att = torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device)
        with autocast_for(ids.device):
            if cls_flags is not None:
                out = {"dense": self.mcls_dense(ids, att, torch.from_numpy(cls_flags).to(ids.device))}
            else:
                out = self(ids, att, dense=dense, sparse=sparse, multivector=multivector)
        return {k: v.float().cpu().numpy() for k, v in out.items() if k != "mask"}

    def mcls_rows(self, input_ids: Sequence[Sequence[int]], every: int, dense: bool = True,
                  sparse: bool = False, multivector: bool = False) -> tuple[list, list]:
        """Token id rows with MCLS's inserted CLS tokens and their CLS flags (raylib.mcls)."""
        from raylib.mcls import insert_cls

        if not dense or sparse or multivector:
            raise ValueError("mcls applies to the dense head only: ask for dense alone")
        rows = [insert_cls(r, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, every,
                           self.settings.max_length) for r in input_ids]
        return [r for r, _ in rows], [f for _, f in rows]

    def mcls_dense(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cls_flags: torch.Tensor) -> torch.Tensor:
        """[B, H] mean of the CLS positions' last hidden states, normalized if configured."""
        from raylib.mcls import mcls_pool

        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mcls_pool(hidden, cls_flags)
        return F.normalize(pooled, dim=-1) if self.settings.normalize else pooled

    def encode_dense(self, texts: str | Sequence[str], kind: Kind = "document", **kwargs: Any) -> np.ndarray:
        """Shorthand for encode(...)["dense"]."""
        return self.encode(texts, kind, dense=True, **kwargs)["dense"]


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (SDPA picks flash attention there); a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
