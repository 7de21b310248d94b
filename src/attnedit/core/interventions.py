"""Interventions on unmodified Hugging Face modules: capture, replace, read attention, stop early.

Everything here is a context manager; hooks are registered on entry and removed in ``__exit__``,
which runs on every exit path (normal return, ``StopForward``, any other exception).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnedit.core.adapters import ModelAdapter
from attnedit.core.hf_compat import (
    attention_kernel,
    own_attn_method,
    register_attention,
    set_attention_kernel,
    uses_attention_interface,
)

EditFn = Callable[[torch.Tensor, str], torch.Tensor]
# torch's forward hooks: a module's positional and keyword arguments are whatever its ``forward`` takes (Any
# in torch's own hook signatures); an output is read through ``main_tensor``
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
PreHook = Callable[[nn.Module, Args, Kwargs], tuple[Args, Kwargs] | None]
PostHook = Callable[[nn.Module, Args, object], object]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the last traced module has run."""


def main_tensor(value: object) -> torch.Tensor:
    """The hidden-state tensor of a module's output (element 0 when the module returns a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"module output of type {type(value).__name__} holds no tensor")


def _with_main(value: object, tensor: torch.Tensor) -> object:
    if isinstance(value, torch.Tensor):
        return tensor
    assert isinstance(value, tuple | list)  # main_tensor(value) found the tensor this replaces
    return (tensor, *value[1:])


@dataclass
class Retained:
    """What a traced module saw on the last forward pass."""

    input: torch.Tensor | None = None
    output: object | None = None

    @property
    def hidden(self) -> torch.Tensor:
        """The output's hidden-state tensor."""
        return main_tensor(self.output)


@dataclass
class Trace(contextlib.AbstractContextManager["Trace", bool]):
    """Retain and/or edit the inputs and outputs of named modules (after ROME's ``nethook.TraceDict``).

    ``edit_input(x, name)`` / ``edit_output(y, name)`` return the replacement tensor; gradients flow
    through replacements. ``stop=True`` ends the forward pass once every named module has run (a parent
    block finishes after the modules inside it); the ``StopForward`` it raises is swallowed on exit.
    """

    model: nn.Module
    names: Sequence[str]
    retain_input: bool = False
    retain_output: bool = True
    detach: bool = False
    edit_input: EditFn | None = None
    edit_output: EditFn | None = None
    stop: bool = False
    reduce_output: Callable[[object, str], object] | None = None  # what to keep of an output
    retained: dict[str, Retained] = field(default_factory=dict, init=False)
    _handles: list[RemovableHandle] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.names = list(dict.fromkeys(self.names))
        modules = dict(self.model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"modules not found in {type(self.model).__name__}: {missing}")
        self._fired: set[str] = set()
        self._modules = {n: modules[n] for n in self.names}

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def __enter__(self) -> Trace:
        self._fired.clear()
        try:
            for name, module in self._modules.items():
                self.retained[name] = Retained()
                if self.retain_input or self.edit_input is not None:
                    self._handles.append(
                        module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
                    )
                self._handles.append(module.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def _pre_hook(self, name: str) -> PreHook:
        def hook(module: nn.Module, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs] | None:
            if args:
                x, rest, in_kwargs = args[0], args[1:], False
            else:  # some blocks receive hidden_states by keyword
                x, rest, in_kwargs = kwargs["hidden_states"], (), True
            if self.edit_input is not None:
                x = self.edit_input(x, name)
            if self.retain_input:
                self.retained[name].input = self._keep(x)
            if self.edit_input is None:
                return None
            if in_kwargs:
                return rest, {**kwargs, "hidden_states": x}
            return (x, *rest), kwargs

        return hook

    def _post_hook(self, name: str) -> PostHook:
        def hook(module: nn.Module, args: Args, output: object) -> object:
            if self.edit_output is not None:
                output = _with_main(output, self.edit_output(main_tensor(output), name))
            if self.retain_output:
                kept = output if self.reduce_output is None else self.reduce_output(output, name)
                if isinstance(kept, torch.Tensor):
                    self.retained[name].output = self._keep(kept)
                else:
                    assert isinstance(kept, Iterable)  # a module's tuple of outputs, or reduce_output's
                    self.retained[name].output = tuple(
                        self._keep(o) if isinstance(o, torch.Tensor) else o for o in kept
                    )
            self._fired.add(name)
            if self.stop and len(self._fired) == len(self._modules):
                self._fired.clear()
                raise StopForward
            return output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.remove()
        return exc_type is StopForward

    def __getitem__(self, name: str) -> Retained:
        return self.retained[name]


def replace_positions(
    batch_index: torch.Tensor, positions: torch.Tensor, values: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that returns ``x`` with ``x[batch_index[i], positions[i]] = values[i]`` (differentiable)."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[batch_index, positions] = values.to(out.dtype)
        return out

    return edit


def add_at_positions(
    batch_index: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that returns ``x`` with ``delta`` added at ``(batch_index[i], positions[i])``."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[batch_index, positions] = out[batch_index, positions] + delta.to(out.dtype)
        return out

    return edit


@contextlib.contextmanager
def attention_implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    """Switch the attention kernel (``eager`` to get probabilities) and restore it on exit."""
    previous = attention_kernel(model)
    if previous == implementation:
        yield
        return
    set_attention_kernel(model, implementation)
    try:
        yield
    finally:
        set_attention_kernel(model, previous)


class LayerView(Mapping[int, torch.Tensor]):
    """Live read-only view layer -> tensor over a running ``Trace`` (valid inside and after the block)."""

    def __init__(
        self, trace: Trace, names: dict[str, int], read: Callable[[Retained, str], torch.Tensor | None]
    ):
        self._trace, self._read = trace, read
        self._by_layer = {layer: name for name, layer in names.items()}

    def __getitem__(self, layer: int) -> torch.Tensor:
        value = self._read(self._trace[self._by_layer[layer]], self._by_layer[layer])
        if value is None:
            raise KeyError(f"layer {layer} has not run yet")
        return value

    def __iter__(self) -> Iterator[int]:
        return (
            layer
            for layer, name in self._by_layer.items()
            if self._trace[name].output is not None or self._trace[name].input is not None
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _attention_weights(retained: Retained, name: str) -> torch.Tensor | None:
    out = retained.output
    if out is None:
        return None
    weights: torch.Tensor | None = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    if weights is None:
        raise RuntimeError(f"attention module {name} returned no probabilities (is attention eager?)")
    return weights


@contextlib.contextmanager
def attention_probabilities(
    model: nn.Module,
    adapter: ModelAdapter,
    layers: Iterable[int] | None = None,
    detach: bool = True,
    query: torch.Tensor | None = None,
) -> Iterator[LayerView]:
    """Record attention probabilities ``[batch, query_head, query, key]`` per layer.

    With ``query`` (one query position per batch row) only those rows are kept: ``[batch, head, key]``.
    Switches to eager attention for the block (fused kernels return no probabilities) and back on
    exit. With grouped-query attention the probabilities are per query head.
    """
    layer_list = list(range(adapter.n_layers)) if layers is None else list(layers)
    names = {adapter.module_name("attn", layer): layer for layer in layer_list}
    reduce = None
    if query is not None:
        rows = torch.arange(query.shape[0], device=query.device)

        def reduce(output: object, name: str) -> tuple[None, torch.Tensor]:
            weights = _attention_weights(Retained(output=output), name)
            assert weights is not None  # None only for a module that has not run
            return None, weights[rows, :, query]

    with (
        attention_implementation(model, "eager"),
        Trace(model, list(names), detach=detach, reduce_output=reduce) as trace,
    ):
        yield LayerView(trace, names, _attention_weights)


def split_heads(x: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    """[..., n_heads * head_dim] -> [..., n_heads, head_dim] (the per-head attention outputs)."""
    return x.view(*x.shape[:-1], adapter.n_heads, adapter.head_dim)


@contextlib.contextmanager
def head_outputs(
    model: nn.Module,
    adapter: ModelAdapter,
    layers: Iterable[int],
    replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    detach: bool = True,
) -> Iterator[LayerView]:
    """Read (and optionally replace) per-head attention outputs, the input of the output projection.

    ``replace(heads, layer)`` receives ``[batch, seq, n_heads, head_dim]`` and returns the same shape.
    The view maps layer -> ``[batch, seq, n_heads, head_dim]`` as the projection received it.
    """
    names = {adapter.module_name("attn_o", layer): layer for layer in layers}

    def edit(x: torch.Tensor, name: str) -> torch.Tensor:
        assert replace is not None  # installed only with a replace
        return replace(split_heads(x, adapter), names[name]).reshape(x.shape)

    def read(retained: Retained, name: str) -> torch.Tensor | None:
        return None if retained.input is None else split_heads(retained.input, adapter)

    with Trace(
        model,
        list(names),
        retain_input=True,
        retain_output=False,
        detach=detach,
        edit_input=edit if replace is not None else None,
    ) as trace:
        yield LayerView(trace, names, read)


@contextlib.contextmanager
def qkv_heads(
    model: nn.Module,
    adapter: ModelAdapter,
    component: str,
    layers: Iterable[int],
    replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    detach: bool = True,
) -> Iterator[LayerView]:
    """Read (and optionally replace) the per-head output of the query, key or value projection
    (``component``: ``attn_q``, ``attn_k``, ``attn_v``), in every family, fused projections included.

    These are the projections' outputs as the module computed them: before any rotary position embedding
    the attention applies afterwards. ``replace(heads, layer)`` receives ``[batch, seq, n_heads, head_dim]``
    (key/value heads for ``attn_k``/``attn_v``) and returns the same shape; in a fused projection only this
    component's part of the output is replaced. The view maps layer -> ``[batch, seq, n_heads, head_dim]``.
    """
    projections = {layer: adapter.qkv(component, layer) for layer in layers}
    names = {p.module: layer for layer, p in projections.items()}

    def edit(y: torch.Tensor, name: str) -> torch.Tensor:
        projection, layer = projections[names[name]], names[name]
        assert replace is not None  # installed only with a replace
        out = y.clone()  # the other parts of a fused output pass through unchanged
        projection.heads(out).copy_(replace(projection.heads(y), layer))
        return out

    def read(retained: Retained, name: str) -> torch.Tensor | None:
        return None if retained.output is None else projections[names[name]].heads(retained.hidden)

    with Trace(model, list(names), detach=detach, edit_output=edit if replace is not None else None) as trace:
        yield LayerView(trace, names, read)


@contextlib.contextmanager
def start_at_layer(
    model: nn.Module, adapter: ModelAdapter, layer: int, lower_output: object
) -> Iterator[None]:
    """Run the model from block ``layer`` on: every block below returns ``lower_output``.

    ``lower_output`` is what block ``layer - 1`` returned on an earlier pass over the same batch (its
    output object as the model's loop expects it, tensor or tuple). When nothing below ``layer`` can
    have changed, this skips their recomputation exactly, with no family-specific code: the blocks'
    ``forward`` is shadowed on the instance and restored on exit.
    """
    if layer <= 0:
        yield
        return
    blocks = [adapter.module(model, "layer", i) for i in range(layer)]

    def skipped(*args: object, **kwargs: object) -> object:
        return lower_output

    try:
        for block in blocks:
            block.forward = skipped
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _linear_in(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


@contextlib.contextmanager
def linear_precision(
    model: nn.Module, adapter: ModelAdapter, first_layer: int, dtype: torch.dtype
) -> Iterator[int]:
    """Inside: every ``nn.Linear`` of blocks ``>= first_layer`` and the vocabulary projection multiplies in
    ``dtype`` (e.g. bfloat16 on CPUs with AMX, where it is 2-3x faster than float32 at small batches).

    Weights are cast once on entry (the model's own weights are not touched); each call casts its input to
    ``dtype`` and its output back to the input's dtype, so everything between the matmuls (norms,
    attention, residual sums, losses) keeps its precision, and gradients flow through the casts. Linear
    layers whose weights are already ``dtype``, and modules that are not ``nn.Linear`` (GPT-2's
    ``Conv1D``), are left as they are. Yields how many modules multiply in ``dtype``; ``forward`` is
    shadowed on the instances and restored on exit.
    """
    modules = [
        m
        for i in range(max(first_layer, 0), adapter.n_layers)
        for m in adapter.module(model, "layer", i).modules()
        if isinstance(m, nn.Linear)
    ]
    head = adapter.unembedding(model)
    if isinstance(head, nn.Linear):
        modules.append(head)
    modules = [m for m in dict.fromkeys(modules) if m.weight.dtype != dtype]
    try:
        for m in modules:
            weight = m.weight.detach().to(dtype)
            bias = None if m.bias is None else m.bias.detach().to(dtype)
            m.__dict__["forward"] = functools.partial(_linear_in, weight, bias)  # as ``m.forward = ...`` does
        yield len(modules)
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


# --- attention scores and probabilities inside the softmax (SADR section 3.4 and appendix D.2) ---

SoftmaxEdit = Callable[[torch.Tensor, int], torch.Tensor]  # ([batch, query_head, query, key], layer) -> same
PATCHABLE_ATTENTION = "attnedit_eager"  # the attention implementation registered for attention_softmax
_SOFTMAX_HOOK = "_attnedit_softmax"  # instance attribute of an attention module while it is hooked


@dataclass
class AttentionSoftmax:
    """What ``attention_softmax`` saw per layer, ``[batch, query_head, query, key]``, after any edit:
    the scores before the softmax (attention mask added) and the probabilities after it."""

    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    probabilities: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _SoftmaxHook:
    """Eager attention of one layer with optional edits before and after the softmax."""

    layer: int
    edit_scores: SoftmaxEdit | None = None
    edit_probabilities: SoftmaxEdit | None = None
    record: AttentionSoftmax | None = None
    detach: bool = True

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        upcast: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``softmax(q k^T * scale + mask) v`` per query head: output ``[batch, head, query, head_dim]``."""
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: query heads per key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        if upcast:  # GPT-J keeps the scores in float32
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        if self.edit_scores is not None:
            scores = self.edit_scores(scores, self.layer)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        if self.edit_probabilities is not None:
            probs = self.edit_probabilities(probs, self.layer)
        if self.record is not None:
            self.record.scores[self.layer] = scores.detach() if self.detach else scores
            self.record.probabilities[self.layer] = probs.detach() if self.detach else probs
        return torch.matmul(probs, value), probs


def _patchable_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``AttentionInterface`` function registered as ``PATCHABLE_ATTENTION``: eager attention that runs
    the hook ``attention_softmax`` put on the module (plain eager attention on modules without one)."""
    if dropout:
        raise RuntimeError("attention_softmax needs the model in eval mode (it applies no attention dropout)")
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        from attnedit.core.adapters import UnsupportedModelError

        raise UnsupportedModelError(f"attention_softmax does not implement {unsupported} attention")
    hook: _SoftmaxHook = module.__dict__.get(_SOFTMAX_HOOK) or _SoftmaxHook(layer=-1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, probs = hook.attend(query, key, value, attention_mask, scale, upcast=False)
    return out.transpose(1, 2).contiguous(), probs


def _register_patchable_attention() -> None:
    """Register ``PATCHABLE_ATTENTION`` (attention function and its eager-style mask) once per process."""
    register_attention(PATCHABLE_ATTENTION, _patchable_attention)


@contextlib.contextmanager
def attention_softmax(
    model: nn.Module,
    adapter: ModelAdapter,
    layers: Iterable[int] | None = None,
    edit_scores: SoftmaxEdit | None = None,
    edit_probabilities: SoftmaxEdit | None = None,
    retain: bool = True,
    detach: bool = True,
) -> Iterator[AttentionSoftmax]:
    """Read and replace attention scores (before the softmax) and probabilities (after it) per query head.

    ``edit_scores(scores, layer)`` and ``edit_probabilities(probs, layer)`` receive and return
    ``[batch, query_head, query, key]``; the scores include the attention mask (masked keys hold the
    dtype's minimum). The attention of the hooked layers is computed here, eagerly, from the query, key and
    value the module computed (so rotary embeddings, caches and grouped-query layouts stay the family's own):

    * families whose attention goes through transformers' ``AttentionInterface`` (Llama, Qwen2, Mistral,
      GPT-2, GPT-NeoX) are switched for the block to the implementation ``attnedit_eager`` registered here;
      layers that are not hooked run plain eager attention;
    * attention modules with their own eager ``_attn(query, key, value, attention_mask)`` (GPT-J) get it
      shadowed on the instance.

    Other models raise ``UnsupportedModelError``. Attention dropout is not applied (eval mode only).
    """
    layer_list = list(range(adapter.n_layers)) if layers is None else list(layers)
    modules = {layer: adapter.module(model, "attn", layer) for layer in layer_list}
    record = AttentionSoftmax()
    hooks = {
        layer: _SoftmaxHook(layer, edit_scores, edit_probabilities, record if retain else None, detach)
        for layer in layer_list
    }
    if uses_attention_interface(model):
        _register_patchable_attention()
        switch: contextlib.AbstractContextManager[None] = attention_implementation(model, PATCHABLE_ATTENTION)
        attribute = _SOFTMAX_HOOK
        installed: dict[int, object] = dict(hooks)
    elif "flash" not in str(attention_kernel(model)) and all(
        callable(getattr(m, "_attn", None)) for m in modules.values()
    ):
        switch, attribute = contextlib.nullcontext(), "_attn"

        def own_attn(
            module: nn.Module, hook: _SoftmaxHook
        ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
            scale_attn = cast("torch.Tensor | float", module.scale_attn)  # GPT-J: a plain attribute

            def attn(  # GPT-J divides the scores by scale_attn
                query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return hook.attend(query, key, value, mask, 1.0 / float(scale_attn), True)

            return own_attn_method(attn)

        installed = {layer: own_attn(modules[layer], hook) for layer, hook in hooks.items()}
    else:
        from attnedit.core.adapters import UnsupportedModelError

        raise UnsupportedModelError(
            f"attention_softmax supports models using transformers' AttentionInterface and GPT-J-style "
            f"_attn modules, not {type(model).__name__}"
        )
    with switch:
        try:
            for layer, module in modules.items():
                module.__dict__[attribute] = installed[layer]
            yield record
        finally:
            for module in modules.values():
                module.__dict__.pop(attribute, None)


@contextlib.contextmanager
def row_deltas(
    model: nn.Module, deltas: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[int]
) -> Iterator[None]:
    """Run one batch in which each row sees its own weight edit: row ``r`` computes with the weights
    plus ``deltas[rows[r]]`` (parameter name -> delta in the parameter's layout), as if that edit were
    applied. Used to generate for many edited cases in one batch: decoding reads every weight once per
    step, whatever the batch size, so batching cases amortises it.

    A changed ``weight`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` and a changed ``bias`` are supported
    (output += x @ delta per row group), also a bias the model does not have, which the edit creates
    (``deltas.WeightEdit``): that row's output gets it added. Any other parameter raises. The result
    equals applying the edit up to float rounding (x W + x D instead of x (W + D)).
    """
    from attnedit.core.deltas import bias_owner

    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    params = dict(model.named_parameters())
    by_module: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for k, edit in enumerate(deltas):
        members = (rows_t == k).nonzero().flatten()
        if not len(members):
            continue
        for name, delta in edit.items():
            module_name, _, kind = name.rpartition(".")
            like: torch.Tensor
            if name in params:
                like = params[name]
            else:
                try:  # a bias the edit creates: its module weight's dtype and device
                    like = bias_owner(model, name).weight
                except ValueError:
                    raise KeyError(f"the model has no parameter {name!r}") from None
            if kind not in ("weight", "bias"):
                raise ValueError(f"per-row deltas support weights and biases, not {name!r}")
            moved = delta.to(like.device, like.dtype)
            by_module.setdefault(module_name, {}).setdefault(kind, []).append((members, moved))
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []

    def hook_for(
        module: nn.Module, parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> Callable[[nn.Module, Args, torch.Tensor], torch.Tensor]:
        transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x @ W + b
        if "weight" in parts and not (isinstance(module, nn.Linear) or transposed):
            kind = type(module).__name__
            raise TypeError(f"per-row weight deltas need a Linear or Conv1D module, not {kind}")

        def hook(_module: nn.Module, args: Args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            extra = torch.zeros_like(output)
            for members, delta in parts.get("weight", []):
                idx = members.to(x.device)
                extra[idx] += x[idx] @ delta if transposed else x[idx] @ delta.T
            for members, delta in parts.get("bias", []):
                extra[members.to(x.device)] += delta
            return output + extra

        return hook

    try:
        for module_name, parts in by_module.items():
            handles.append(modules[module_name].register_forward_hook(hook_for(modules[module_name], parts)))
        yield
    finally:
        for handle in handles:
            handle.remove()
