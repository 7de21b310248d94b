import pytest
import torch

from attnedit.core.interventions import (
    StopForward,
    Trace,
    add_at_positions,
    attention_probabilities,
    head_outputs,
    replace_positions,
)
from attnedit.core.models import ModelBundle


def _ids(bundle: ModelBundle, text: str = "The Eiffel Tower is located in the city of Paris") -> torch.Tensor:
    return torch.tensor([bundle.tokenizer(text).input_ids])


def _hook_count(model: torch.nn.Module) -> int:
    """Hooks beyond the ones transformers installs itself (its output recorders)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) - _BASELINE.get(
        id(model), 0
    )


_BASELINE: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _record_baseline(request):
    if "tiny" in request.fixturenames:
        model = request.getfixturevalue("tiny").model
        model(torch.tensor([[3, 4, 5]]), output_hidden_states=True)  # let transformers install its own
        _BASELINE[id(model)] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_matches_hidden_states(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    ids = _ids(tiny)
    names = [a.module_name("layer", i) for i in range(a.n_layers)]
    with Trace(model, names, detach=True) as trace:
        out = model(ids, output_hidden_states=True)
    for i, name in enumerate(names[:-1]):  # the last hidden state is after the final norm
        torch.testing.assert_close(trace[name].hidden, out.hidden_states[i + 1])
    assert _hook_count(model) == 0


def test_replacing_with_own_values_reproduces_and_gradients_flow(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    ids = _ids(tiny)
    name = a.module_name("mlp", 1)
    with Trace(model, [name], detach=True) as trace:
        clean = model(ids).logits
    saved = trace[name].hidden
    pos = torch.tensor([2, 4])
    with Trace(
        model,
        [name],
        edit_output=lambda y, n: replace_positions(torch.zeros(2, dtype=torch.long), pos, saved[0, pos])(y),
    ):
        again = model(ids).logits
    torch.testing.assert_close(again, clean)

    delta = torch.zeros(a.hidden_size, requires_grad=True)
    edit = add_at_positions(torch.tensor([0]), torch.tensor([3]), delta[None])
    with Trace(model, [name], edit_output=lambda y, n: edit(y)):
        loss = model(ids).logits[0, -1].logsumexp(-1)
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_edit_input_changes_downstream_only_where_edited(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    ids = _ids(tiny)
    name = a.module_name("mlp_down", 0)
    clean = model(ids).logits
    with Trace(model, [name], retain_input=True, edit_input=lambda x, n: x * 0) as trace:
        zeroed = model(ids).logits
    assert torch.all(trace[name].input == 0)
    assert not torch.allclose(zeroed, clean)


def test_hooks_removed_on_exception(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    implementation = model.config._attn_implementation

    def boom(y, n):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Trace(model, [a.module_name("mlp", 0)], edit_output=boom):
        model(_ids(tiny))
    assert _hook_count(model) == 0
    with pytest.raises(ValueError), attention_probabilities(model, a):
        raise ValueError("inside")
    assert _hook_count(model) == 0
    assert model.config._attn_implementation == implementation  # the eager switch is undone


def test_stop_forward_early(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    first, last = a.module_name("layer", 0), a.module_name("layer", a.n_layers - 1)
    result = "not returned"
    with Trace(model, [first], stop=True) as trace, Trace(model, [last]) as later:
        result = model(_ids(tiny))
    assert result == "not returned"  # the forward pass raised StopForward, swallowed by Trace
    assert trace[first].output is not None
    assert later[last].output is None  # the last layer never ran
    assert _hook_count(model) == 0
    assert issubclass(StopForward, Exception)


def test_attention_probabilities_shape_and_rows(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    ids = _ids(tiny)
    before = model.config._attn_implementation
    with attention_probabilities(model, a, layers=[0, 2]) as probs:
        model(ids)
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before
    assert sorted(probs) == [0, 2]
    n = ids.shape[1]
    for w in probs.values():
        assert w.shape == (1, a.n_heads, n, n)  # per QUERY head, also with grouped-query attention
        torch.testing.assert_close(w.sum(-1), torch.ones(1, a.n_heads, n))
        assert torch.all(w.triu(1) == 0)  # causal


def test_head_outputs_read_and_replace(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    ids = _ids(tiny)
    clean = model(ids).logits
    with head_outputs(model, a, [1]) as heads:
        model(ids)
    assert heads[1].shape == (1, ids.shape[1], a.n_heads, a.head_dim)
    with head_outputs(model, a, [1], replace=lambda h, layer: h.clone()):
        same = model(ids).logits
    torch.testing.assert_close(same, clean)

    def drop_head0(h, layer):
        h = h.clone()
        h[:, :, 0] = 0
        return h

    with head_outputs(model, a, [1], replace=drop_head0) as seen:
        changed = model(ids).logits
    assert torch.all(seen[1][:, :, 0] == 0)
    assert not torch.allclose(changed, clean)
    # the per-head split is the o-projection's input layout: recombining reproduces it
    o = a.module(model, "attn_o", 1)
    with Trace(model, [a.module_name("attn_o", 1)], retain_input=True, detach=True) as t:
        model(ids)
    torch.testing.assert_close(
        o(heads[1].reshape(1, ids.shape[1], -1)), o(t[a.module_name("attn_o", 1)].input)
    )
