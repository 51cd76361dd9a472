"""Compile the small-batch decode kernels for sm_90 without a GPU and print ptxas's resource use.

Run without TRITON_INTERPRET (the kernels must be JIT functions, not the interpreter's):

    python3 tests/sm90_compile.py

One JSON object per line: the kernel variant, registers, spill bytes (stores, loads), shared
memory. The variants are the ones `gptfast.model._GemvStages` launches for gpt2 (C=768, 12 heads of 64,
block size 16) in bf16 at batch 1 and 8, on a 132-SM GPU (H100/H200). Used by
tests/test_gemv_decode.py; handy by hand when changing a kernel's tiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gptfast.ops import attn_decode, gemv, head_argmax, ln_linear, proj_residual

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SM_COUNT = 132
FLOAT_SCALARS = {"eps", "qk_scale"}


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of `kernel`: constexprs as given, pointers `*bf16` unless named in
    `pointers`, scalars i32 (fp32 for eps/qk_scale)."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def _attrs(kernel, constexprs: dict, ints: dict[str, int]) -> dict:
    """What the JIT would specialise on at launch: pointers 16-byte aligned (every tensor the
    model passes is), integer arguments whose value (in `ints`; absent: not) is a multiple of
    16, except those the kernel marks do_not_specialize."""
    attrs = {}
    for i, param in enumerate(kernel.params):
        if param.name in constexprs or param.do_not_specialize:
            continue
        if param.name.endswith("_ptr") or ints.get(param.name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _compile(label: str, kernel, pointers: dict[str, str], constexprs: dict, ints: dict[str, int],
             num_warps=4, num_stages=3) -> dict:
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs,
                    attrs=_attrs(kernel, constexprs, ints))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        # NOTE: Triton targets sm_90a (wgmma) for capability 9.0
        info = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    smem = re.search(r"(\d+) bytes smem", info)
    return dict(kernel=label, registers=regs, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                smem=int(smem.group(1)) if smem else 0, num_warps=num_warps)


def variants():
    gemv.sm_count = lambda device: SM_COUNT  # the launchers' tile choice for a 132-SM GPU
    dev = torch.device("cuda", 0)
    for R in (1, 8):
        for label, N, K, embed, gelu, argmax in (
            ("K1 embed+ln_1+c_attn", 2304, 768, True, False, False),
            ("K1 ln_1+c_attn", 2304, 768, False, False, False),
            ("K4 ln_2+c_fc+gelu", 3072, 768, False, True, False),
            ("head ln_f+lm_head fp32 logits", 50257, 768, False, False, False),
            ("head ln_f+lm_head argmax partials", 50257, 768, False, False, True),
        ):
            br, bn, bk = gemv.blocks(R, N, K, dev)
            G = triton.cdiv(N, bn)  # the argmax partials' row stride
            head = label.startswith("head")
            out = "*fp32" if head else "*bf16"
            pointers = dict(out_ptr=out, idx_ptr="*i32" if argmax else out, flag_ptr="*i32" if argmax else out,
                            tok_ptr="*i64", pos_ptr="*i64")
            const = dict(EMBED=embed, HAS_LN=True, HAS_LNW=True, HAS_LNB=True, HAS_BIAS=not head, GELU=gelu,
                         ARGMAX=argmax, BLOCK_R=br, BLOCK_N=bn, BLOCK_K=bk)
            ints = dict(stride_out=G if argmax else N, stride_x=768, stride_wpe=768, stride_w=768, N=N, K=K,
                        V=50257, P=1024)
            yield _compile(f"{label} R={R} ({br}x{bn}x{bk})", ln_linear._ln_linear_kernel, pointers, const, ints)
        for label, N, K, merge in (("K3 merge+c_proj+residual", 768, 768, True),
                                   ("K5 c_proj+residual", 768, 3072, False)):
            br, bn, bk = gemv.blocks(R, N, K, dev)
            S = attn_decode._decode_num_splits(R, 12, 1024, 64, SM_COUNT)
            S = min(S, attn_decode.PARTIALS_MAX_SPLITS)
            bs = triton.next_power_of_2(S)
            if merge:
                bk = min(bk, max(16, 4096 // (br * bs)))
            pointers = dict(x_ptr="*fp32" if merge else "*bf16", acc_ptr="*fp32", ml_ptr="*fp32")
            const = dict(MERGE=merge, HAS_BIAS=True, HEAD_DIM=64 if merge else 1, BLOCK_S=bs, BLOCK_R=br, BLOCK_N=bn,
                         BLOCK_K=bk, UNROLL=1 if merge else 2)
            ints = dict(stride_out=N, stride_x=K, stride_w=K, stride_res=N, N=N, K=K, H=12)
            shown = f"{br}x{bn}x{bk}, S={S}" if merge else f"{br}x{bn}x{bk}"
            yield _compile(f"{label} R={R} ({shown})", proj_residual._linear_residual_kernel, pointers, const, ints)
    pointers = dict(out_ptr="*fp32", part_acc_ptr="*fp32", part_ml_ptr="*fp32", slot_ptr="*i64", bt_ptr="*i32",
                    seq_lens_ptr="*i32")
    const = dict(HEAD_DIM=64, SPLIT=True, APPEND=True, HAS_QKV_BIAS=False, BLOCK_SIZE=16, BLOCK_N=64, BLOCK_D=64)
    # q, k_new, v_new: views of the [B, 3, H, D] projection (batch stride 3 * 768, head stride 64)
    ints = dict(stride_qb=2304, stride_qh=64, stride_ob=0, stride_oh=0, stride_k_slot=768, stride_kh=64,
                stride_v_slot=768, stride_vh=64, stride_knb=2304, stride_knh=64, stride_vnb=2304, stride_vnh=64,
                stride_bt=64, max_blocks=64, H=12)
    yield _compile("K2 decode_attention_partials (+append)", attn_decode._decode_split_kernel, pointers, const, ints,
                   num_stages=2)
    G = triton.cdiv(50257, gemv.blocks(1, 50257, 768, dev)[1])
    block_g = min(1024, triton.next_power_of_2(G))
    yield _compile(f"head argmax reduce G={G}", head_argmax._argmax_reduce_kernel,
                   dict(tok_ptr="*i64", status_ptr="*i32", pmax_ptr="*fp32", pidx_ptr="*i32", pflag_ptr="*i32"),
                   dict(BLOCK_G=block_g), {}, num_warps=4)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for row in variants():
        print(json.dumps(row), flush=True)
