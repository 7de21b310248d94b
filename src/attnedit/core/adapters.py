"""One adapter per model family: the single table that maps abstract components to module paths.

Every intervention, editor and metric is written against the names here (``layer``, ``mlp_out``,
``attn_o``...), never against a family's own module names. A new architecture is one new
``FamilyTable`` entry in ``FAMILIES`` below. Query, key and value are read and written through
``ModelAdapter.qkv`` (and ``qkv_weight``/``qkv_bias``), which also covers families that fuse them into one
projection: the table says which part of the fused module's output each of them is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnedit.core.hf_compat import model_config, output_embeddings


class UnsupportedModelError(ValueError):
    """Raised for a model class no adapter knows."""


QKV = ("attn_q", "attn_k", "attn_v")  # the components a fused projection computes together, in this order
# How a fused projection lays out its output features (checked against transformers' own attention code):
#   blocks:   [q | k | v], each block head-major [head][head_dim] (GPT-2 ``c_attn``, split by embed width)
#   per_head: [head][q, k, v][head_dim], interleaved per head (GPT-NeoX ``query_key_value``, viewed as
#             [..., heads, 3 * head_dim] and chunked in three)
QKV_LAYOUTS = ("blocks", "per_head")


@dataclass(frozen=True)
class FamilyTable:
    """Module paths of one family; ``{}`` stands for the layer index."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # container of the transformer blocks
    embed: str  # token embedding
    attn: str  # attention module of block {}; its output[0] is the attention output, [1] the weights
    attn_q: str | None  # separate projections (None where fused: attn_qkv and qkv_layout say where)
    attn_k: str | None
    attn_v: str | None
    attn_qkv: str | None  # fused q/k/v projection (GPT-2 c_attn, NeoX query_key_value)
    attn_o: str  # attention output projection; its input is the per-head outputs concatenated
    mlp: str  # MLP module of block {}
    mlp_in: str  # MLP input projection (up/fc_in)
    mlp_down: str  # MLP down-projection: the matrix locate-then-edit methods rewrite
    final_norm: str  # the unembedding is ``model.get_output_embeddings()`` in every family
    # GPT-2's Conv1D stores weights as [in, out] (transposed w.r.t. nn.Linear)
    conv1d: bool = False
    # GPT-J and GPT-NeoX (parallel residual) feed attention and MLP the same block input
    parallel_residual: bool = False
    # where q, k and v lie in the fused projection's output (one of QKV_LAYOUTS); None where separate
    qkv_layout: str | None = None

    def __post_init__(self) -> None:
        fused = [c for c in QKV if getattr(self, c) is None]
        if fused and (self.attn_qkv is None or self.qkv_layout not in QKV_LAYOUTS):
            raise ValueError(
                f"family {self.family!r}: {fused} have no module of their own, so the table needs attn_qkv "
                f"and a qkv_layout from {QKV_LAYOUTS}"
            )


FAMILIES: tuple[FamilyTable, ...] = (
    FamilyTable(
        family="llama",
        model_types=("llama", "qwen2", "mistral", "qwen3", "gemma", "olmo"),
        layers="model.layers",
        embed="model.embed_tokens",
        attn="model.layers.{}.self_attn",
        attn_q="model.layers.{}.self_attn.q_proj",
        attn_k="model.layers.{}.self_attn.k_proj",
        attn_v="model.layers.{}.self_attn.v_proj",
        attn_qkv=None,
        attn_o="model.layers.{}.self_attn.o_proj",
        mlp="model.layers.{}.mlp",
        mlp_in="model.layers.{}.mlp.up_proj",
        mlp_down="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
    ),
    FamilyTable(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        attn="transformer.h.{}.attn",
        attn_q=None,
        attn_k=None,
        attn_v=None,
        attn_qkv="transformer.h.{}.attn.c_attn",
        attn_o="transformer.h.{}.attn.c_proj",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.c_fc",
        mlp_down="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        conv1d=True,
        qkv_layout="blocks",
    ),
    FamilyTable(
        family="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        embed="transformer.wte",
        attn="transformer.h.{}.attn",
        attn_q="transformer.h.{}.attn.q_proj",
        attn_k="transformer.h.{}.attn.k_proj",
        attn_v="transformer.h.{}.attn.v_proj",
        attn_qkv=None,
        attn_o="transformer.h.{}.attn.out_proj",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_down="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f",
        parallel_residual=True,
    ),
    FamilyTable(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        attn="gpt_neox.layers.{}.attention",
        attn_q=None,
        attn_k=None,
        attn_v=None,
        attn_qkv="gpt_neox.layers.{}.attention.query_key_value",
        attn_o="gpt_neox.layers.{}.attention.dense",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
        mlp_down="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        parallel_residual=True,
        qkv_layout="per_head",
    ),
)

COMPONENTS = (
    "layer",
    "attn",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_o",
    "mlp",
    "mlp_in",
    "mlp_down",
)


@dataclass(frozen=True)
class QKVProjection:
    """Where one layer's query, key or value projection is computed: a module of its own, or its part of
    a fused q/k/v module's output features (``layout`` from ``QKV_LAYOUTS``)."""

    component: str  # attn_q, attn_k or attn_v
    module: str  # path of the module whose output holds it
    layout: str | None  # None: the module computes only this projection
    n_heads: int  # heads of this projection (key/value heads under grouped-query attention)
    head_dim: int
    features: int  # output features of the module
    offset: int = 0  # blocks layout: the first output feature of this projection's block

    @property
    def width(self) -> int:
        return self.n_heads * self.head_dim

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        """This projection's ``[..., n_heads, head_dim]`` out of the module's output features ``[..., out]``.

        A view: writing into it writes into ``features``."""
        if self.layout == "per_head":
            grouped = torch.unflatten(features, -1, (self.n_heads, len(QKV), self.head_dim))
            return grouped[..., QKV.index(self.component), :]
        if self.layout == "blocks":
            features = features[..., self.offset : self.offset + self.width]
        return torch.unflatten(features, -1, (self.n_heads, self.head_dim))

    def rows(self) -> torch.Tensor:
        """Indices of this projection's output features in the module's output, head-major (the order of
        a separate projection's output)."""
        return self.heads(torch.arange(self.features)).flatten()


@dataclass(frozen=True)
class ModelAdapter:
    """Names and head layout of one loaded model, resolved from its family table and config."""

    table: FamilyTable
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None = None  # longest sequence the position embeddings allow

    @property
    def family(self) -> str:
        return self.table.family

    @property
    def kv_group_size(self) -> int:
        """Query heads sharing one key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def module_name(self, component: str, layer: int | None = None) -> str:
        """Module path of an abstract component (``layer``, ``attn``, ``mlp_down``...) at ``layer``."""
        if component == "layer":
            if layer is None:
                raise ValueError("component 'layer' needs a layer index")
            return f"{self.table.layers}.{layer}"
        if component not in COMPONENTS and component not in ("embed", "final_norm"):
            raise KeyError(f"unknown component {component!r}; known: {COMPONENTS}")
        path: str | None = getattr(self.table, component)
        if path is None and component in QKV:  # fused: the module whose output holds it (see ``qkv``)
            path = self.table.attn_qkv
        if path is None:
            raise UnsupportedModelError(f"family {self.family!r} has no {component!r} module")
        if "{}" in path:
            if layer is None:
                raise ValueError(f"component {component!r} needs a layer index")
            if not 0 <= layer < self.n_layers:
                raise IndexError(f"layer {layer} out of range 0..{self.n_layers - 1}")
            return path.format(layer)
        return path

    def module(self, model: nn.Module, component: str, layer: int | None = None) -> nn.Module:
        return model.get_submodule(self.module_name(component, layer))

    def unembedding(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary (``lm_head``/``embed_out``, tied or not)."""
        return output_embeddings(model)

    def mlp_down_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The MLP down-projection as an [out_features, in_features] view (Conv1D transposed)."""
        return self.weight_view(model, "mlp_down", layer)

    def weight_name(self, component: str, layer: int) -> str:
        """Parameter name of a linear component's weight (what an edit's delta is keyed by)."""
        return f"{self.module_name(component, layer)}.weight"

    def weight_view(self, model: nn.Module, component: str, layer: int) -> torch.Tensor:
        """A linear component's weight as an [out_features, in_features] view (Conv1D transposed)."""
        if component in QKV and self.qkv(component, layer).layout is not None:
            raise ValueError(
                f"{component} of family {self.family!r} is part of a fused projection: "
                f"use qkv_weight (per head) or weight_view('attn_qkv')"
            )
        weight = module_weight(self.module(model, component, layer))
        return weight.T if self.table.conv1d else weight

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An [out, in] delta in the parameter's own layout ([in, out] for GPT-2's Conv1D)."""
        return delta.T if self.table.conv1d else delta

    def attn_o_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The attention output projection as an [out_features, in_features] view."""
        return self.weight_view(model, "attn_o", layer)

    def qkv(self, component: str, layer: int) -> QKVProjection:
        """Where the query (``attn_q``), key (``attn_k``) or value (``attn_v``) projection of ``layer`` is
        computed, in every family: read and write q/k/v through this, never through a module's own layout."""
        if component not in QKV:
            raise KeyError(f"{component!r} is not one of {QKV}")
        n_heads = self.n_heads if component == "attn_q" else self.n_kv_heads
        layout = None if getattr(self.table, component) is not None else self.table.qkv_layout
        if layout == "per_head" and self.n_kv_heads != self.n_heads:
            raise UnsupportedModelError(
                f"family {self.family!r}: per-head fused q/k/v needs as many key/value heads as query heads"
            )
        # heads per part: the query holds n_heads, key and value n_kv_heads (grouped-query attention)
        sizes = [h * self.head_dim for h in (self.n_heads, self.n_kv_heads, self.n_kv_heads)]
        part = QKV.index(component)
        features, offset = sizes[part], 0
        if layout is not None:  # [q | k | v] in blocks, or the same features interleaved per head
            features, offset = sum(sizes), sum(sizes[:part])
        return QKVProjection(
            component=component,
            module=self.module_name(component, layer),
            layout=layout,
            n_heads=n_heads,
            head_dim=self.head_dim,
            features=features,
            offset=offset,
        )

    def qkv_weight(self, model: nn.Module, component: str, layer: int) -> torch.Tensor:
        """The q, k or v projection's weight as an ``[n_heads, head_dim, in_features]`` view (in-place edits
        reach the model), whatever the family's storage (fused, Conv1D-transposed)."""
        projection = self.qkv(component, layer)
        weight = module_weight(model.get_submodule(projection.module))
        by_input = weight if self.table.conv1d else weight.T  # [in, out]
        return projection.heads(by_input).permute(1, 2, 0)

    def qkv_bias(self, model: nn.Module, component: str, layer: int) -> torch.Tensor | None:
        """The q, k or v projection's bias as an ``[n_heads, head_dim]`` view (None without a bias)."""
        projection = self.qkv(component, layer)
        bias = getattr(model.get_submodule(projection.module), "bias", None)
        return None if bias is None else projection.heads(bias)


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, the parameter of a linear component (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight parameter"
    return weight


def _config_value(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Resolve the adapter for a loaded Hugging Face causal LM (by ``config.model_type``)."""
    config = model_config(model)
    model_type = getattr(config, "model_type", None)
    table = next((t for t in FAMILIES if model_type in t.model_types), None)
    if table is None:
        raise UnsupportedModelError(
            f"no adapter for model class {type(model).__name__} (model_type={model_type!r}); "
            f"add a FamilyTable to FAMILIES in {__file__}"
        )
    n_layers = _config_value(config, "num_hidden_layers", "n_layer")
    n_heads = _config_value(config, "num_attention_heads", "n_head")
    hidden = _config_value(config, "hidden_size", "n_embd")
    if n_layers is None or n_heads is None or hidden is None:
        raise UnsupportedModelError(f"config of {type(model).__name__} lacks layer/head/hidden sizes")
    n_kv = _config_value(config, "num_key_value_heads") or n_heads
    head_dim = _config_value(config, "head_dim") or hidden // n_heads
    return ModelAdapter(
        table=table,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=int(config.vocab_size),
        max_positions=_config_value(config, "max_position_embeddings", "n_positions"),
    )
