"""Helpers the engine tests share: a tiny random model, a request served alone, a clean pool."""

from __future__ import annotations

from gptfast import GPT2, Engine, SamplingParams, get_config

TINY = get_config("tiny")


def tiny_model(**kwargs) -> GPT2:
    """The tiny preset with seed-0 random weights (`kwargs`: block_size, num_kv_blocks, ...)."""
    return GPT2.from_config(TINY, seed=0, **kwargs)


def alone(prompt, new, model=None, seed=0, **kw) -> list[int]:
    """The request's tokens on a fresh engine and an empty cache of a model with the same weights
    as `model` (None: `tiny_model()`)."""
    if model is None:
        model = tiny_model()
    else:
        fresh = GPT2(model.config, block_size=model.block_size)
        fresh.load_state_dict(model.state_dict())
        model = fresh
    engine = Engine(model)
    [sid] = engine.add(prompt, SamplingParams(max_new_tokens=new, **kw), seeds=[seed])
    out = []
    while engine.has_unfinished():
        out += [o.token for o in engine.step() if o.seq_id == sid]
    return out


def assert_clean(model) -> None:
    """Every block back in the pool, no sequence running, the block manager's invariants hold."""
    s = model.kv_cache.stats()
    assert s["free_blocks"] == s["total_blocks"] and s["running_sequences"] == 0, s
    model.kv_cache.manager.check_invariants()
