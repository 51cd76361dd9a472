"""`GPT2.weights_version`: per-model detection of replaced parameter tensors.

The decode graphs hold the addresses of the parameters, so a live engine must notice when one of
its model's parameters is replaced, and only its own model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gptfast import GPT2, Engine, SamplingParams, get_config
from gptfast import graphs as graphs_mod


def _model(**kwargs):
    return GPT2.from_config(get_config("tiny-odd"), seed=1, **kwargs)


def _new_parameter(p: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(p.detach().clone(), requires_grad=False)


REPLACEMENTS = {
    "linear weight": lambda m: setattr(m.h[0].mlp.c_fc, "weight", _new_parameter(m.h[0].mlp.c_fc.weight)),
    "layernorm bias": lambda m: setattr(m.h[1].ln_2, "bias", _new_parameter(m.h[1].ln_2.bias)),
    "embedding": lambda m: setattr(m.wpe, "weight", _new_parameter(m.wpe.weight)),
    "register_parameter": lambda m: m.ln_f.register_parameter("weight", _new_parameter(m.ln_f.weight)),
    "whole module": lambda m: setattr(m.h[0], "mlp", copy.deepcopy(m.h[0].mlp)),
    "list item": lambda m: m.h.__setitem__(1, copy.deepcopy(m.h[1])),
    "load_state_dict assign": lambda m: m.load_state_dict(
        {k: v.clone() for k, v in m.state_dict().items()}, assign=True),
    "cast": lambda m: m.to(torch.float16),
    "quantize": lambda m: m.quantize_weights("int8"),
}


@pytest.mark.parametrize("change", list(REPLACEMENTS), ids=list(REPLACEMENTS))
def test_a_replacement_changes_the_version(change):
    model = _model()
    before = model.weights_version
    REPLACEMENTS[change](model)
    assert model.weights_version != before, f"{change}: the version did not change"


def test_modules_swapped_in_count_into_their_new_model():
    model = _model()
    model.h[0].mlp = copy.deepcopy(model.h[0].mlp)
    before = model.weights_version
    model.h[0].mlp.c_proj.weight = _new_parameter(model.h[0].mlp.c_proj.weight)
    assert model.weights_version != before


def test_untied_head_counts():
    model = GPT2.from_config(get_config("tiny-odd").replace(tie_word_embeddings=False), seed=0)
    before = model.weights_version
    model.lm_head.weight = _new_parameter(model.lm_head.weight)
    assert model.weights_version != before


def test_in_place_updates_and_noop_moves_keep_the_version():
    model = _model()
    before = model.weights_version
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.mul_(2.0)
    model.to("cpu")
    model.float()
    model.quantize_weights(None)  # the mode it already has
    assert model.weights_version == before


def test_state_dict_keys_are_unchanged():
    # the gptfast module classes must not add or rename parameters (checkpoints load by these names)
    names = set(_model().state_dict())
    assert {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_proj.bias",
            "ln_f.bias"} <= names
    assert all(n.split(".")[0] in {"wte", "wpe", "h", "ln_f"} for n in names), sorted(names)


def test_another_models_registration_leaves_this_models_runner_alone(monkeypatch):
    """Two models, one live engine on the first with the static-buffer runner: replacing a
    parameter of the second neither changes the first's version nor makes the engine look its
    runner up again; replacing one of the first's does."""
    first, second = _model(), _model()
    engine = Engine(first, cuda_graphs=True)
    engine.add([5, 9, 2], SamplingParams(max_new_tokens=6), seeds=[0])
    engine.step()  # prefill
    engine.step()  # a decode step on the runner
    lookups = []
    real = graphs_mod.graph_runner
    monkeypatch.setattr(graphs_mod, "graph_runner", lambda *a, **k: lookups.append(1) or real(*a, **k))
    version = first.weights_version
    fc = second.h[0].mlp.c_fc
    fc.weight = _new_parameter(fc.weight)
    assert first.weights_version == version
    engine.step()
    assert lookups == [], "a registration on another model made this engine rebuild its runner"
    fc = first.h[0].mlp.c_fc
    fc.weight = _new_parameter(fc.weight)
    engine.step()
    assert lookups == [1]
    engine.abort()


def test_quantizing_again_to_the_same_mode_keeps_the_int8_copies_and_the_version():
    model = GPT2.from_config(get_config("tiny"), seed=0).quantize_weights("int8")
    model(torch.tensor([[1, 2, 3]]))  # builds the int8 copies
    linear = model.h[0].attn.c_attn
    copy_before, version = linear._int8, model.weights_version
    assert copy_before is not None
    model.quantize_weights("int8")  # nothing changes: the graphs may hold these copies' addresses
    assert linear._int8 is copy_before and model.weights_version == version
    model.quantize_weights(None)
    assert linear._int8 is None and model.weights_version != version
