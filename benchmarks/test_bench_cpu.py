"""pytest-benchmark cases for what runs on the CPU: each op's eager reference at its CPU sizes, and
a short generation on the tiny preset (gptfast and HF on the same weights).

    pytest benchmarks --benchmark-only                       # run
    pytest benchmarks --benchmark-only --benchmark-autosave  # save as a baseline
    pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Plain `pytest` does not collect this folder (testpaths = tests). Op cases come from each module
of `gptfast.bench.op_cases` (`benchmark_cases("cpu", quick=True)`), so a new op appears here
without an edit.
"""

import pytest
import torch

from gptfast.bench import e2e, runner
from gptfast.ops.common import ref_name

_MODULES = [(name, mod) for name, mod in runner.discover() if not isinstance(mod, BaseException)]
_CASES = [(mod, case) for _, mod in _MODULES for case in mod.benchmark_cases("cpu", True)]


@pytest.mark.parametrize("module,case", _CASES, ids=[f"{c.op}[{c.label}]" for _, c in _CASES])
def test_op_reference(benchmark, module, case):
    ref = getattr(module, ref_name(case.op))
    arg_sets = [case.make_args() for _ in range(2)]
    benchmark.extra_info.update(op=case.op, label=case.label, bytes_moved=case.bytes_moved)
    benchmark(runner.rotating(ref, arg_sets))


@pytest.fixture(scope="module")
def tiny_models():
    GPT2, generate = e2e._gptfast_api()
    hf, _ = e2e.build_hf_model("tiny", seed=0)
    return hf, GPT2.from_pretrained(hf, dtype=torch.float32, device="cpu"), generate


PROMPT = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))


def test_generate_tiny_gptfast(benchmark, tiny_models):
    hf, model, generate = tiny_models
    expected = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16,
                           do_sample=False, pad_token_id=0)
    out = benchmark(lambda: generate(model, input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT),
                                     max_new_tokens=16, do_sample=False, pad_token_id=0))
    assert torch.equal(out, expected)  # a fast wrong answer is no result


def test_generate_tiny_hf(benchmark, tiny_models):
    hf, _, _ = tiny_models
    benchmark(lambda: hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16,
                                  do_sample=False, pad_token_id=0))
