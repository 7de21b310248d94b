"""An edited model in a standard architecture, for a checkpoint that plain transformers loads.

Most edits change existing weights only: the model is saved as it is. An edit may also CREATE parameters
(``WeightEdit.created``): MEMAT folds its corrections into attention output-projection biases that some
architectures lack, and transformers' ``from_pretrained`` would drop a parameter its architecture does not
declare. ``standard_model`` then re-expresses the edited model in one that holds them, computing the same
function:

* GPT-2 and GPT-NeoX: their projections have biases already; nothing is created, nothing changes.
* Llama: the configuration gets ``attention_bias=True`` (biases on q, k, v and o), the biases the edits
  did not create are zeros. Exact: adding a zero bias changes no bit.
* Qwen2 and Mistral: transformers gives their ``o_proj`` no bias at all, so the model is saved as a
  ``LlamaForCausalLM`` with ``attention_bias=True`` (the same modules under the same names, the same
  computation): Qwen2's q/k/v biases carry over, Mistral's are zeros. Exact, except that Llama has no
  sliding window: where the model's would apply (a window shorter than its positions), the logits are
  equal for inputs up to the window's length, and the returned notes say so.
* GPT-J: attention and MLP run in parallel and are added to the same residual, so an ``out_proj`` bias is
  an addition to the same block's ``mlp.fc_out`` bias: it is folded there. Equal up to float rounding
  (the order of the additions changes).

Other architectures with created parameters are refused (``CheckpointError``). The re-expressed model is
built on the meta device and given the edited model's tensors (new ones only where a bias is added or
folded), so it costs no second copy of the weights; it is for ``save_pretrained``, not for running.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from attnedit.core.adapters import ModelAdapter
from attnedit.core.hf_compat import model_config

logger = logging.getLogger(__name__)

# the model types that ``standard_model`` re-expresses as Llama with attention biases
AS_LLAMA = ("llama", "qwen2", "mistral")
# configuration keys of Qwen2 and Mistral that a Llama configuration does not take (their sliding window)
_NOT_LLAMA = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


class CheckpointError(ValueError):
    """The edited model cannot be written in an architecture plain transformers loads."""


@dataclass
class StandardModel:
    """The model to save and what differs from the edited model's own architecture."""

    model: PreTrainedModel
    architecture: str  # the saved model's class name
    source_architecture: str  # the edited model's class name
    notes: list[str] = field(default_factory=list)  # one sentence each: what changed and how exact it is
    # where the saved model computes otherwise than the edited one (a sliding window it drops)
    caveats: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the saved model is not the edited model itself (a bias added, folded, a new class)."""
        return bool(self.notes)


def standard_model(model: PreTrainedModel, adapter: ModelAdapter, created: Iterable[str]) -> StandardModel:
    """``model`` (edited: the parameters ``created`` are biases the edits created) in an architecture whose
    ``from_pretrained`` loads every parameter; see the module docstring. ``model`` itself is not changed."""
    created = sorted(set(created))
    name = type(model).__name__
    if not created:
        return StandardModel(model, name, name)
    config = model_config(model)
    model_type = str(getattr(config, "model_type", ""))
    biases = _attention_biases(adapter)
    unknown = [n for n in created if n not in biases]
    if unknown:
        raise CheckpointError(
            f"the edits create {unknown[0]}, which is not an attention projection's bias: no standard "
            f"{model_type} checkpoint holds it"
        )
    if adapter.family == "gptj":
        unfolded = [n for n in created if biases[n][0] != "attn_o"]
        if unfolded:
            raise CheckpointError(
                f"the edits create {unfolded[0]}: of the biases GPT-J lacks, only the attention output "
                "projection's can be written (folded into the MLP output bias)"
            )
        return _gptj_folded(model, adapter, created)
    if adapter.family == "llama" and model_type in AS_LLAMA:
        return _as_llama(model, adapter, created, model_type)
    raise CheckpointError(
        f"the edits create {created[0]}, which {model_type} models do not have; attnedit writes created "
        f"attention biases for the model types {', '.join(AS_LLAMA)} (as Llama with attention biases) and "
        "gptj (folded into the MLP output bias)"
    )


def _attention_biases(adapter: ModelAdapter) -> dict[str, tuple[str, int]]:
    """Bias name -> (component, layer) of every separate attention projection of the model."""
    found = {}
    for layer in range(adapter.n_layers):
        for component in ("attn_q", "attn_k", "attn_v", "attn_o"):
            if getattr(adapter.table, component) is not None:
                found[f"{adapter.module_name(component, layer)}.bias"] = (component, layer)
    return found


def _rebuild(
    source: PreTrainedModel, cls: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, Any]
) -> PreTrainedModel:
    """A ``cls`` model with ``config`` holding exactly the tensors of ``state`` (built on the meta device,
    then given them: no copy), tied as its configuration says, with ``source``'s generation settings."""
    with torch.device("meta"):
        rebuilt = cls(config)
    rebuilt.load_state_dict(state, strict=True, assign=True)
    rebuilt.tie_weights()  # assigning gave tied weights a parameter each: tie them again
    rebuilt.generation_config = copy.deepcopy(source.generation_config)
    rebuilt.eval()
    return rebuilt


def _gptj_folded(model: PreTrainedModel, adapter: ModelAdapter, created: list[str]) -> StandardModel:
    """GPT-J: every created ``out_proj`` bias added to its block's ``mlp.fc_out`` bias."""
    state = dict(model.state_dict())
    layers = []
    for name in created:
        layer = _attention_biases(adapter)[name][1]
        target = f"{adapter.module_name('mlp_down', layer)}.bias"
        bias = state.pop(name)
        state[target] = state[target] + bias.to(state[target].dtype)  # a new tensor: the model is unchanged
        layers.append(layer)
    name = type(model).__name__
    rebuilt = _rebuild(model, type(model), copy.deepcopy(model_config(model)), state)
    note = (
        f"the attention output-projection biases the edits created (layers {layers}) are folded into the "
        "same blocks' MLP output biases (mlp.fc_out.bias): GPT-J adds attention and MLP outputs to the same "
        "residual, so the logits are equal up to float rounding (the order of the additions changes)"
    )
    return StandardModel(rebuilt, name, name, [note])


def _as_llama(
    model: PreTrainedModel, adapter: ModelAdapter, created: list[str], model_type: str
) -> StandardModel:
    """Llama, Qwen2, Mistral: a ``LlamaForCausalLM`` with ``attention_bias=True``, zero biases where the
    model has none."""
    source = model_config(model)
    settings = source.to_dict()
    for key in ("model_type", "architectures", "transformers_version", *_NOT_LLAMA):
        settings.pop(key, None)
    settings["attention_bias"] = True
    config = LlamaConfig(**settings)
    state = dict(model.state_dict())
    added = []
    for name in _attention_biases(adapter):
        if name not in state:
            weight = state[name.removesuffix(".bias") + ".weight"]
            state[name] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            added.append(name)
    rebuilt = _rebuild(model, LlamaForCausalLM, config, state)
    name = type(model).__name__
    zeros = "the q/k/v/o biases the model lacks are zeros" if added else "no bias had to be added"
    if model_type == "llama":
        note = (
            f"the edits create attention biases ({len(created)}): the configuration sets attention_bias=true "
            f"and {zeros} (exact: a zero bias changes nothing)"
        )
    else:
        carried = ", Qwen2's q/k/v biases carry over" if model_type == "qwen2" else ""
        note = (
            f"the edits create attention biases ({len(created)}), which {name} has no place for: the model "
            f"is saved as LlamaForCausalLM (the same modules and computation) with attention_bias=true"
            f"{carried} and {zeros} (exact)"
        )
    caveats = []
    window = sliding_window(source)
    if window is not None:
        size, layers = window
        caveats.append(
            f"{name}'s sliding window of {size} tokens (layers {layers}) is not part of LlamaForCausalLM: "
            f"the logits are equal for inputs of up to {size} tokens; on longer ones every token attends to "
            "all earlier tokens"
        )
    return StandardModel(rebuilt, "LlamaForCausalLM", name, [note], caveats)


def sliding_window(config: PretrainedConfig) -> tuple[int, list[int]] | None:
    """The sliding window of a Qwen2 or Mistral configuration as ``(size, layers)`` where it would apply
    (some layer uses it and it is shorter than the model's positions); None otherwise."""
    size = getattr(config, "sliding_window", None)
    if not isinstance(size, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    n_layers = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: every layer
        layers = list(range(n_layers))
    else:  # Qwen2: the layers it names
        layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    positions = getattr(config, "max_position_embeddings", None)
    if not layers or (isinstance(positions, int) and size >= positions):
        return None
    return size, layers
