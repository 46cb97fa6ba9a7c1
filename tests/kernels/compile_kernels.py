"""Compile every kernel for a CUDA target without a GPU (Triton's compiler runs on the CPU), so
that a machine with no GPU still catches what the interpreter lets through: type changes of a
loop-carried value, shapes ``tl.dot`` refuses, ints that Triton specialises to constants.

Each compiled kernel's shared memory must fit the target's (``metadata.shared``): a tile that
the interpreter runs happily can still be refused at launch with OutOfResources.

Run as a script with ``TRITON_INTERPRET`` unset (``tests/kernels/test_launch.py`` does):
``python tests/kernels/compile_kernels.py [sm]``. Needs Triton's ``ASTSource(fn, signature,
constexprs)`` with names as keys (triton >= 3.3); exits 3 where that API differs, 1 where a
kernel needs more shared memory than the target has.
"""

from __future__ import annotations

import inspect
import sys

FLOATS = {"eps", "gain", "q_scale", "v_scale", "eps_in", "eps_out", "gain_in", "gain_out"}
# Shared memory one block may use (opt-in maximum): A100 (sm_80), H100/H200 (sm_90).
SHARED_MEMORY = {80: 166_912, 90: 232_448}


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Types by name: ``*_ptr`` from ``pointers`` (default fp32), floats, constexprs, else i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def cases():
    """(kernel, pointer types, constexprs[, launch options]) for each compiled case."""
    import torch

    from ddpm_fast.kernels import (
        channel_norm,
        group_norm,
        linear_attention,
        projection,
        sampler_step,
    )

    gn_flags = ("HAS_PRE_BIAS", "HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "SILU")
    gn_flags += ("HAS_RESIDUAL", "HAS_RES_BIAS", "HAS_OUT2", "HAS_EDGE")
    on = dict.fromkeys(gn_flags, True)
    off = dict.fromkeys(gn_flags, False)
    half = {"x_ptr": "bf16", "y_ptr": "bf16", "y2_ptr": "bf16", "r_ptr": "bf16"}
    yield group_norm._group_norm_fused_kernel, half, {"BLOCK_C": 16, "BLOCK_S": 256, **on}
    # Ints equal to 1 arrive as constants: 1 channel per group, a 1 x 1 image, unit strides.
    ones = {"Cg": 1, "HW": 1, "sxS": 1, "syS": 1, "spbC": 1}
    yield group_norm._group_norm_fused_kernel, {}, {"BLOCK_C": 2, "BLOCK_S": 2, **off, **ones}
    yield (
        group_norm._group_norm_partial_kernel,
        half,
        {"BLOCK_C": 64, "BLOCK_S": 64, "HAS_PRE_BIAS": True, "HAS_EDGE": True},
    )
    yield group_norm._group_norm_apply_kernel, {"x_ptr": "fp16", "y_ptr": "fp32"}, {
        "BLOCK_C": 128, "BLOCK_S": 32, "BLOCK_P": 64, **on,
    }  # fmt: skip
    cn = {"BLOCK_C": 512, "BLOCK_S": 8}
    around = ("HAS_PRE_BIAS", "HAS_RESIDUAL", "HAS_RES_BIAS", "HAS_OUT2")
    yield channel_norm._channel_norm_kernel, {}, {
        **cn, "CENTER": True, "HAS_SCALE": False, "HAS_SHIFT": False, "SILU": False,
        **dict.fromkeys(around, True),
    }  # fmt: skip
    yield channel_norm._channel_norm_kernel, half, {
        **cn, "CENTER": False, "HAS_SCALE": True, "HAS_SHIFT": True, "SILU": True,
        **dict.fromkeys(around, False),
    }  # fmt: skip
    # The projection: LayerNorm in (fp32, IEEE dot), and all 512 outputs of a LayerNorm out in
    # bf16, with the tiles and warps the launcher picks.
    proj_flags = {"HAS_BIAS": True, "HAS_RESIDUAL": True, "HAS_OUT2": True}
    qkv = projection.projection_settings(512, 384, 32 * 32, None)
    warps = {"num_warps": qkv.pop("num_warps")}
    yield projection._projection_kernel, {}, {
        **qkv, "NORM_IN": 1, "NORM_OUT": 0, "FP32_DOT": True, **proj_flags,
    }, warps  # fmt: skip
    normed = projection.projection_settings(128, 512, 16 * 16, "layer")
    warps = {"num_warps": normed.pop("num_warps")}
    bf16_proj = {"x_ptr": "bf16", "w_ptr": "bf16", "r_ptr": "bf16", "y_ptr": "bf16"}
    yield projection._projection_kernel, {**bf16_proj, "y2_ptr": "bf16"}, {
        **normed, "NORM_IN": 2, "NORM_OUT": 1, "FP32_DOT": False, **proj_flags,
    }, warps  # fmt: skip
    la = {"BLOCK_D": 32, "BLOCK_N": 64}
    yield linear_attention._context_kernel, {"qkv_ptr": "bf16"}, la
    yield linear_attention._context_kernel, {}, {"BLOCK_D": 16, "BLOCK_N": 16, "N": 1}
    bf16_io = {"qkv_ptr": "bf16", "mem_ptr": "bf16", "out_ptr": "bf16"}
    yield linear_attention._output_kernel, bf16_io, {**la, "BLOCK_M": 16, "HAS_MEM": True}
    yield linear_attention._output_kernel, {}, {**la, "BLOCK_M": 16, "HAS_MEM": False, "S": 1}
    # The widest head (d = 128) with the most memory slots, as the launcher sets it up.
    wide = linear_attention.linear_attention_settings(
        4, linear_attention.MAX_HEAD_DIM, 32 * 32, torch.device("cpu"),
        memory=linear_attention.MAX_MEMORY,
    )  # fmt: skip
    tiles = {k: wide[k] for k in ("BLOCK_D", "BLOCK_N")}
    warps = {"num_warps": wide["num_warps"]}
    yield linear_attention._context_kernel, {}, tiles, warps
    yield linear_attention._output_kernel, {}, {
        **tiles, "BLOCK_M": wide["BLOCK_M"], "HAS_MEM": True,
    }, warps  # fmt: skip
    yield linear_attention._one_pass_kernel, bf16_io, {**la, "BLOCK_M": 16, "HAS_MEM": True}
    yield linear_attention._one_pass_kernel, {}, {
        **tiles, "BLOCK_M": wide["BLOCK_M"], "HAS_MEM": True,
    }, warps  # fmt: skip
    step_ints = {"step_ptr": "i64", "keys_ptr": "i64"}
    step = {"NCOEF": sampler_step.NUM_COEFFICIENTS, "BLOCK": sampler_step.BLOCK}
    yield sampler_step._sampler_step_kernel, {**step_ints, "out_ptr": "bf16", "xc_ptr": "bf16"}, {
        **step, "LEARNED": True, "DRAW": True, "HAS_CAST": True,
    }  # fmt: skip
    yield sampler_step._sampler_step_kernel, step_ints, {
        **step, "LEARNED": False, "DRAW": False, "HAS_CAST": False,
    }  # fmt: skip


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        print(f"triton {triton.__version__}: ASTSource has no constexprs argument", file=sys.stderr)
        return 3
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_MEMORY.get(arch, min(SHARED_MEMORY.values()))
    status = 0
    for kernel, pointers, constexprs, *options in cases():
        src = ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs)
        options = options[0] if options else {}
        compiled = triton.compile(src, target=target, options=options)
        shared = compiled.metadata.shared
        if shared > limit:
            status = 1
            print(f"too much shared memory: {kernel.__name__} {constexprs} {options} needs "
                  f"{shared} B on sm_{arch}, which has {limit}", file=sys.stderr)  # fmt: skip
            continue
        print(
            f"ok {kernel.__name__} sm_{arch} {len(compiled.asm['ptx'])} chars of PTX, "
            f"{shared} B of shared memory"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
