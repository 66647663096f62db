"""Compile every routed-FFN Triton kernel for sm_90 without a GPU (triton.compile with a CUDA target) and say
whether the PTX holds what it should: wgmma for bf16 products, bulk tensor copies (TMA) for descriptor variants,
cp.async for pointer loads. Pointers and strides carry the divisibility-by-16 attribute the JIT gives aligned
arguments.

    python bench/triton_compile_check.py [--all]   # CPU only; run from the repository root (--all: every
                                                   # autotuner configuration too, a few minutes)
"""
import re, sys, triton, itertools
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, '.')
from routefx.backends.triton import kernels as K, decode_kernels as DK
tgt = GPUTarget("cuda", 90, 32)
def sig(fn, types, consts):
    names = fn.arg_names
    s = {}
    for n in names:
        if n in consts: s[n] = "constexpr"
        else: s[n] = types.get(n, "i32")
    return s
def attrs(fn):
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or n.startswith("stride") or n in ("D",)}
def ptrs(fn, dt):
    return {n: ("*" + (dt if n in ("x_ptr","xs_ptr","wu_ptr","wg_ptr","wgu_ptr","bu_ptr","bg_ptr","h_ptr","wd_ptr","bd_ptr","gates_ptr","y_ptr") else ("fp32" if n=="part_ptr" else "i32" if n!="routes_ptr" else "i64"))) for n in fn.arg_names if n.endswith("_ptr")}
ok = 0
for dt in ("bf16", "fp32"):
  for tma, flat, paired in ((0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0), (2, 1, 0), (1, 0, 1), (2, 0, 1), (2, 1, 1)):
    consts = dict(R_P2=16, GATED=True, HAS_BU=False, HAS_BG=False, ACT=1, IEEE=dt=="fp32", ALIGNED=True, TMA=tma, BM=128 if dt=="bf16" else 64, BN=128 if dt=="bf16" else 64, BK=64 if dt=="bf16" else 32, GROUP_M=8, PERSIST=flat, FLATTEN=flat, PAIRED=paired)
    src = ASTSource(K.up_kernel, signature=sig(K.up_kernel, ptrs(K.up_kernel, dt), consts), attrs=attrs(K.up_kernel), constexprs={(K.up_kernel.arg_names.index(k),): v for k,v in consts.items()})
    c = triton.compile(src, target=tgt, options={"num_warps": 8, "num_stages": 3})
    ptx = c.asm["ptx"]; wg = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    print("up", dt, "tma", tma, "flatten", flat, "paired", paired, "smem", c.metadata.shared, wg, "wgmma" in ptx, "cp.async.bulk.tensor" in ptx, "cp.async.cg" in ptx or "cp.async.ca" in ptx); ok += 1
    if paired:
        continue
    consts = dict(R_P2=16, HAS_BD=False, HAS_GATES=False, IEEE=dt=="fp32", ALIGNED=True, TMA=tma, BM=128 if dt=="bf16" else 64, BN=128 if dt=="bf16" else 64, BK=64 if dt=="bf16" else 32, GROUP_M=8, PERSIST=flat, FLATTEN=flat)
    src = ASTSource(K.down_kernel, signature=sig(K.down_kernel, ptrs(K.down_kernel, dt), consts), attrs=attrs(K.down_kernel), constexprs={(K.down_kernel.arg_names.index(k),): v for k,v in consts.items()})
    c = triton.compile(src, target=tgt, options={"num_warps": 8, "num_stages": 3})
    ptx = c.asm["ptx"]; print("down", dt, "tma", tma, "flatten", flat, "smem", c.metadata.shared, "wgmma" in ptx, "cp.async.bulk.tensor" in ptx, "cp.async.cg" in ptx or "cp.async.ca" in ptx); ok += 1
  consts = dict(GATED=True, HAS_BU=False, HAS_BG=False, HAS_GATES=False, ACT=1, IEEE=dt=="fp32", BM=16, BN=64, BK=128)
  src = ASTSource(DK.span_up_kernel, signature=sig(DK.span_up_kernel, ptrs(DK.span_up_kernel, dt), consts), attrs=attrs(DK.span_up_kernel), constexprs={(DK.span_up_kernel.arg_names.index(k),): v for k,v in consts.items()})
  c = triton.compile(src, target=tgt, options={"num_warps": 4, "num_stages": 4}); print("span_up", dt, "cp.async" in c.asm["ptx"]); ok += 1
  consts = dict(HAS_BD=False, HAS_GATES=False, IEEE=dt=="fp32", BM=16, BN=64, BK=128)
  src = ASTSource(DK.span_down_kernel, signature=sig(DK.span_down_kernel, ptrs(DK.span_down_kernel, dt), consts), attrs=attrs(DK.span_down_kernel), constexprs={(DK.span_down_kernel.arg_names.index(k),): v for k,v in consts.items()})
  c = triton.compile(src, target=tgt, options={"num_warps": 4, "num_stages": 4}); print("span_down", dt, "cp.async" in c.asm["ptx"]); ok += 1
print("compiled", ok)

# --all: every configuration of every autotuner (bf16), as the GPU's first call would compile them; reports any
# that fails to compile and those over the H100/H200 shared-memory limit (the autotuner drops those at launch).
if "--all" in sys.argv:
    from routefx.backends.triton import ffn
    SMEM = 232448
    tables = [(f"up_{s}_{'tma' if t else 'ptr'}", K.up_kernel, tu, True) for (s, t), tu in ffn._UP.items()]
    tables += [(f"up_{s}_paired", K.up_kernel, tu, True) for s, tu in ffn._UP_PAIRED.items()]
    tables += [(f"down_{s}_{'tma' if t else 'ptr'}", K.down_kernel, tu, False) for (s, t), tu in ffn._DOWN.items()]
    n, over, failed = 0, [], []
    for name, fn, tuner, up in tables:
        for c in tuner.configs:
            consts = dict(R_P2=16, IEEE=False, ALIGNED=True, **c.kwargs)
            consts.update(dict(GATED=True, HAS_BU=False, HAS_BG=False, ACT=1) if up
                          else dict(HAS_BD=False, HAS_GATES=False))
            if up:
                consts.setdefault("PAIRED", 0)  # the kernel's default (a constexpr the JIT fills in)
            src = ASTSource(fn, signature=sig(fn, ptrs(fn, "bf16"), consts), attrs=attrs(fn),
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            try:
                cc = triton.compile(src, target=tgt, options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            except Exception as e:  # noqa: BLE001
                failed.append((name, str(c), f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            n += 1
            if cc.metadata.shared > SMEM:
                over.append((name, str(c), cc.metadata.shared))
    print(f"--all: compiled {n} configurations, {len(over)} over {SMEM} B of shared memory, {len(failed)} failed")
    for row in failed + over:
        print("  ", row)
