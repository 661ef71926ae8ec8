"""The JSON bodies of the Serve app's routes (pydantic models)."""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


# Numbers in requests: finite and in a range whose float32 arithmetic stays finite.
Bound = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]



Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]



class EmbeddingsRequest(BaseModel):
    """OpenAI POST /v1/embeddings body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    dimensions: Optional[int] = Field(None, ge=-2**31, le=2**31)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    # extension (as Voyage/Cohere): which prefix the Encoder adds; OpenAI has no such notion
    input_type: Literal["query", "document"] = "document"



class EncodeRequest(BaseModel):
    """POST /encode body: the M3 outputs of a list of texts."""

    model_config = ConfigDict(extra="forbid")

    texts: Union[str, list[str]]
    kind: Literal["query", "document"] = "document"
    dense: bool = True
    sparse: bool = False
    multivector: bool = False
    dimensions: Optional[int] = Field(None, ge=-2**31, le=2**31)
    quantization: Optional[Literal["int8", "binary"]] = None
    # MCLS (M3 App. B.2): dense = mean of a CLS inserted every N tokens (paper: 256); torch backend
    mcls: Optional[int] = Field(None, ge=1, le=2**31)
    # int8 calibration: scalar or per-dimension [lo, hi]; default [-1, 1] (normalized vectors)
    int8_range: Optional[tuple[Union[Bound, list[Bound]], Union[Bound, list[Bound]]]] = None



class RerankWeights(BaseModel):
    """Fusion weights of dense, lexical (s_lex) and multi-vector (s_mul) scores (M3 §3.2)."""

    model_config = ConfigDict(extra="forbid")

    dense: Weight = 0.4
    sparse: Weight = 0.2
    multivector: Weight = 0.4



class RerankRequest(BaseModel):
    """POST /rerank body (Cohere/Jina-like)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    query: str
    documents: list[str]
    model: Optional[str] = None
    weights: Optional[Union[RerankWeights, tuple[Weight, Weight, Weight]]] = None
    top_n: Optional[int] = Field(None, ge=1, le=2**31)
    return_documents: bool = False
