"""Interventions on unmodified Hugging Face modules: capture, replace, read attention, stop early.

Everything here is a context manager; hooks are registered on entry and removed in ``__exit__``,
which runs on every exit path (normal return, ``StopForward``, any other exception).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from attnedit.adapters import ModelAdapter

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


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
    return (tensor, *value[1:])  # type: ignore[index]


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
class Trace(contextlib.AbstractContextManager):
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
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, init=False)

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

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
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

    def _post_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if self.edit_output is not None:
                output = _with_main(output, self.edit_output(main_tensor(output), name))
            if self.retain_output:
                kept = output if self.reduce_output is None else self.reduce_output(output, name)
                if isinstance(kept, torch.Tensor):
                    self.retained[name].output = self._keep(kept)
                else:
                    self.retained[name].output = tuple(
                        self._keep(o) if isinstance(o, torch.Tensor) else o
                        for o in kept  # type: ignore[union-attr]
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

    def __exit__(self, exc_type, exc, tb) -> bool:
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
    previous = model.config._attn_implementation
    if previous == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


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
    weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
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

        def reduce(output: object, name: str) -> tuple:
            weights = _attention_weights(Retained(output=output), name)
            return None, weights[rows, :, query]  # type: ignore[index]

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
        return replace(split_heads(x, adapter), names[name]).reshape(x.shape)  # type: ignore[misc]

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
            block.forward = skipped  # type: ignore[method-assign]
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
