"""Compile every fastlt Triton kernel for a GPU architecture without a GPU.

``python -m fastlt.kernels.aot --arch 90`` runs the full Triton pipeline (TTIR → TTGIR →
LLVM → PTX → cubin, with the ptxas bundled in triton) for each kernel in the configurations
the launchers of :mod:`fastlt.kernels.rectify`, :mod:`fastlt.kernels.soft_ce` (and the others) choose at
the benchmark shapes of docs/design.md §1 (C = 1000 and 8142, fp32/bf16/fp16), and reports
registers and spill (stack) bytes per thread from the cubin. The CPU CI runs it
(tests/test_kernels_rectify.py) so that a kernel which only works in the interpreter, or
that starts spilling registers, cannot pass; it does not replace the GPU parity tests of
bench/gpu_check.sh.

It needs triton in compiled mode: run it in a process started without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    """Triton signature in argument order; every argument must be typed here (KeyError otherwise)."""
    sig = {}
    for name in kernel.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def kernel_configs():
    """(label, kernel, types, constexprs, options) for each compiled variant."""
    from . import balscl as bs
    from . import rectify as r
    from . import select as sel
    from . import soft_ce as s
    from . import soft_ce_compact as sc

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b in (7, 256):
            cfg = r._similarity_config(b, dtype)
            precisions = ("tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)
            for precision in precisions:
                t = _TL_DTYPE[dtype]
                types = dict(z_ptr=f"*{t}", c_ptr=f"*{t}", s_ptr="*fp32", B="i32", C="i32", D="i32",
                             stride_zb="i32", stride_zd="i32", stride_cc="i32", stride_cd="i32", stride_sb="i32")
                consts = dict(MIN_SQ=r._MIN_SQ_DIST, INPUT_PRECISION=precision, UPCAST_DOT=False,
                              **{k: v for k, v in cfg.items() if k.isupper()})
                opts = {k: v for k, v in cfg.items() if not k.isupper()}
                out.append((f"similarity {t} B={b} {precision}", r._similarity_kernel, types, consts, opts))
    for c in (1000, 8142, 20000):  # ImageNet-LT, iNaturalist (one register tile), streamed tiles
        cfg = sel.select_config(c, None)
        for softmax in (False, True):
            for dense, compact in ((True, False), (False, True)):
                types = dict(s_ptr="*fp32", out_ptr="*fp32", la_ptr="*i64", lb_ptr="*i64", lam_ptr="*fp32",
                             counts_ptr="*i64", logsum_ptr="*fp64", idx_ptr="*i64", w_ptr="*fp32",
                             gamma_ptr="*fp32", C="i32", K="i32", stride_sb="i32", stride_ob="i32", omega="fp32",
                             inv_temp="fp32")
                # Σ log N precomputed in the dense variants, summed per row in the compact ones,
                # so that both branches are compiled.
                consts = dict(SOFTMAX=softmax, WRITE_DENSE=dense, WRITE_COMPACT=compact, HAS_LOG_SUM=dense,
                              **{k: v for k, v in cfg.items() if k.isupper()})
                out.append((f"select C={c} softmax={softmax} dense={dense}", sel._select_kernel, types, consts,
                            dict(num_warps=cfg["num_warps"])))
    for c in (1000, 8142):
        row = s._row_config(c)
        kcfg = s._k_config(30)
        row_consts = dict(BLOCK_C=row["BLOCK_C"], NUM_TILES=row["NUM_TILES"])
        opts = dict(num_warps=row["num_warps"])
        for dtype in (torch.float32, torch.bfloat16):
            t = _TL_DTYPE[dtype]
            types = dict(x_ptr=f"*{t}", t_ptr="*fp32", bias_ptr="*fp32", loss_ptr="*fp32", gx_ptr=f"*{t}",
                         gt_ptr="*fp32", C="i32", inv_b="fp32", stride_xb="i32", stride_tb="i32", stride_gxb="i32",
                         stride_gtb="i32")
            for write_gx, write_gt in ((False, False), (True, False), (True, True)):
                out.append((f"soft_ce {t} C={c} grad={write_gx} target_grad={write_gt}", s._soft_ce_kernel, types,
                            dict(HAS_BIAS=True, WRITE_GX=write_gx, WRITE_GT=write_gt, **row_consts), opts))
            types = dict(x_ptr=f"*{t}", bias_ptr="*fp32", idx_ptr="*i64", w_ptr="*fp32", gamma_ptr="*fp32",
                         la_ptr="*i64", lb_ptr="*i64", lam_ptr="*fp32", loss_ptr="*fp32", gx_ptr=f"*{t}", C="i32",
                         K="i32", inv_b="fp32", stride_xb="i32", stride_gxb="i32")
            for write_gx in (False, True):
                out.append((f"soft_ce compact {t} C={c} grad={write_gx}", sc._soft_ce_compact_kernel, types,
                            dict(HAS_BIAS=True, WRITE_GX=write_gx, **row_consts, **kcfg), opts))
    # BalSCL at the per-GPU ImageNet-LT shape (32 samples per GPU of a 256 batch: 64 anchors,
    # 512 views + 1000 centers, D 1024); the shapes are runtime arguments, only D and the
    # dtype choose the variant.
    for n, m in ((1512, 64),):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = _TL_DTYPE[dtype]
            fwd = bs.forward_config(n, m, dtype)
            meta = dict(fwd["meta"])
            opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            prec = "tf32x3" if dtype == torch.float32 else "ieee"
            types = dict(x_ptr=f"*{t}", y_ptr="*i64", cnt_ptr="*fp32", part_ptr="*fp32", N="i32", D="i32",
                         anchor_start="i32", M="i32", num_classes="i32", S="i32", tiles_per_split="i32",
                         stride_xn="i32", stride_xd="i32", scale="fp32")
            out.append((f"balscl fwd {t} N={n} M={m}", bs._balscl_fwd_kernel, types,
                        dict(INPUT_PRECISION=prec, UPCAST_DOT=False, **meta), opts))
            bwd = bs.backward_config(n, 1024, dtype)
            meta = dict(bwd["meta"])
            opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            types = dict(x_ptr=f"*{t}", y_ptr="*i64", cnt_ptr="*fp32", lse_ptr="*fp32", invp_ptr="*fp32",
                         g_ptr="*fp32", gx_ptr=f"*{t}", N="i32", D="i32", anchor_start="i32", M="i32",
                         stride_xn="i32", stride_xd="i32", stride_gn="i32", scale="fp32", inv_m="fp32")
            out.append((f"balscl bwd {t} N={n} M={m}", bs._balscl_bwd_kernel, types,
                        dict(INPUT_PRECISION=prec, UPCAST_DOT=False, **meta), opts))
    out.append(("balscl combine", bs._balscl_combine_kernel,
                dict(part_ptr="*fp32", lse_ptr="*fp32", invp_ptr="*fp32", loss_ptr="*fp32", M="i32", S="i32",
                     inv_m="fp32"), dict(BLOCK_A=64, BLOCK_S=32), dict(num_warps=4)))
    return out


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes per thread, from the cuobjdump bundled with triton."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(found.group(1)), stack_bytes=int(found.group(2))) if found else {}


def compile_all(arch: int = 90, warp_size: int = 32) -> list[dict]:
    """Compile every variant for ``sm_<arch>``; returns one record per variant (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._jit import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("fastlt.kernels.aot needs triton in compiled mode; start Python without "
                           "TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, warp_size)
    records = []
    for label, kernel, types, consts, opts in kernel_configs():
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, _signature(kernel, types, consts), consts), target=target,
                                      options=opts)
        except Exception as exc:
            raise RuntimeError(f"{label}: compilation for sm_{arch} failed: {exc}") from exc
        records.append(dict(kernel=label, arch=arch, seconds=round(time.perf_counter() - start, 3),
                            cubin_bytes=len(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                            num_warps=compiled.metadata.num_warps, **_resource_usage(compiled.asm["cubin"])))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability ×10, e.g. 90 (repeatable)")
    args = parser.parse_args(argv)
    records = []
    for arch in args.arch or [90]:
        records += compile_all(arch)
    json.dump(records, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
