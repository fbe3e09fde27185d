"""A compiled CPU kernel for decode attention over the paged cache: C source, build and load.

Decode attention in plain torch must gather every sequence's blocks into a fresh tensor in every layer
(the copy is most of its cost). This kernel reads the blocks where they lie, through the block table,
with an online softmax per (sequence, kv head): one pass over the live keys and values.

It is built on first use with the system C compiler (`cc -O3 -march=native -fopenmp`) into a cache
directory keyed by the source and the CPU, and loaded with ctypes. Where no compiler is found, or the
build fails, `load()` returns None and attention.py keeps its torch path. TRITON_VLM_CPU_KERNEL=0 turns
it off. OpenMP comes from torch's own libgomp (same soname, already loaded), so both share one pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define AHEAD 1  /* blocks prefetched ahead: 1, 2 and 4 measured the same; none, 15% slower */

/* One kv head of one block: `live` keys against the head's `group` queries, folded into the online
   softmax state (m: running maximum, l: running sum of exp(score - m), acc: the weighted values). */
static inline __attribute__((always_inline)) void fold_block(
        const float *q, const float *kb, const float *vb, int live, float *m, float *l, float *acc, float *s,
        int group, const int dim, float scale) {
    for (int g = 0; g < group; g++) {
        const float *qg = q + (size_t)g * dim;
        int t = 0;
        for (; t + 4 <= live; t += 4) {  /* four independent dot products hide the FMA latency */
            const float *k0 = kb + (size_t)t * dim, *k1 = k0 + dim, *k2 = k1 + dim, *k3 = k2 + dim;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int d = 0; d < dim; d++) {
                a0 += qg[d] * k0[d]; a1 += qg[d] * k1[d]; a2 += qg[d] * k2[d]; a3 += qg[d] * k3[d];
            }
            s[t] = a0 * scale; s[t + 1] = a1 * scale; s[t + 2] = a2 * scale; s[t + 3] = a3 * scale;
        }
        for (; t < live; t++) {
            const float *kt = kb + (size_t)t * dim;
            float a = 0.0f;
            for (int d = 0; d < dim; d++) a += qg[d] * kt[d];
            s[t] = a * scale;
        }
        float top = m[g];
        for (t = 0; t < live; t++) top = s[t] > top ? s[t] : top;
        float keep = expf(m[g] - top);  /* 0 on the first block: m[g] is -inf */
        float sum = 0.0f;
        for (t = 0; t < live; t++) { s[t] = expf(s[t] - top); sum += s[t]; }
        float *ag = acc + (size_t)g * dim;
        for (int d = 0; d < dim; d++) ag[d] *= keep;
        for (t = 0; t < live; t++) {
            const float *vt = vb + (size_t)t * dim;
            for (int d = 0; d < dim; d++) ag[d] += s[t] * vt[d];
        }
        l[g] = l[g] * keep + sum;
        m[g] = top;
    }
}

/* One query row, all heads, block by block: a block's heads lie side by side in the cache, so each
   block is read as one contiguous run of K and one of V, and the next block's are prefetched meanwhile.
   Inlined with a constant dim (see paged_decode), so loops unroll. */
static inline __attribute__((always_inline)) void attend(
        const float *q, const float *kc, const float *vc, const int32_t *table, int ctx, float *out,
        int heads, int kv_heads, const int dim, int bs, float scale) {
    int group = heads / kv_heads;
    size_t block_floats = (size_t)kv_heads * bs * dim;
    float m[heads], l[heads], acc[heads * dim], s[bs];
    for (int j = 0; j < heads; j++) { m[j] = -INFINITY; l[j] = 0.0f; }
    for (int j = 0; j < heads * dim; j++) acc[j] = 0.0f;
    int blocks = (ctx + bs - 1) / bs;
    for (int b = 0; b < blocks; b++) {
        int live = ctx - b * bs < bs ? ctx - b * bs : bs;
        const float *kb = kc + (size_t)table[b] * block_floats, *vb = vc + (size_t)table[b] * block_floats;
        if (b + AHEAD < blocks) {
            const char *kn = (const char *)(kc + (size_t)table[b + AHEAD] * block_floats);
            const char *vn = (const char *)(vc + (size_t)table[b + AHEAD] * block_floats);
            for (size_t off = 0; off < block_floats * sizeof(float); off += 64) {
                __builtin_prefetch(kn + off, 0, 3);
                __builtin_prefetch(vn + off, 0, 3);
            }
        }
        for (int h = 0; h < kv_heads; h++) {
            size_t head = (size_t)h * bs * dim;
            fold_block(q + (size_t)h * group * dim, kb + head, vb + head, live, m + h * group, l + h * group,
                       acc + (size_t)h * group * dim, s, group, dim, scale);
        }
    }
    for (int j = 0; j < heads; j++)
        for (int d = 0; d < dim; d++) out[(size_t)j * dim + d] = acc[(size_t)j * dim + d] / l[j];
}

/* q, out: [n, heads, dim]; kc, vc: [blocks, kv_heads, bs, dim]; row i reads blocks
   tables[offsets[i]:offsets[i+1]] and its first ctx[i] keys. */
void paged_decode(const float *q, const float *kc, const float *vc, const int32_t *tables,
                  const int32_t *offsets, const int32_t *ctx, float *out, int n, int heads, int kv_heads,
                  int dim, int bs, float scale, int threads) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < n; i++) {
        size_t row = (size_t)i * heads * dim;
        const int32_t *table = tables + offsets[i];
        if (dim == 64)
            attend(q + row, kc, vc, table, ctx[i], out + row, heads, kv_heads, 64, bs, scale);
        else if (dim == 128)
            attend(q + row, kc, vc, table, ctx[i], out + row, heads, kv_heads, 128, bs, scale);
        else
            attend(q + row, kc, vc, table, ctx[i], out + row, heads, kv_heads, dim, bs, scale);
    }
}
"""

# Reassociation lets the dot products vectorise, no errno lets expf; infinities stay (the maximum starts at -inf).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno", "-std=c99"]

_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "triton-vlm" / "kernels"


def _cpu_key() -> str:
    """The CPU's model and flags: -march=native code must not load on another CPU that shares the cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        wanted = []
    return "\n".join([platform.machine(), *wanted])


def library_path() -> Path:
    digest = hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), _cpu_key()]).encode()).hexdigest()[:16]
    return cache_dir() / f"paged_decode-{digest}.so"


def build(path: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "paged_decode.c", Path(tmp) / path.name
        src.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(out, path)  # atomic: a concurrent loader sees the whole library or none


def load():
    """The kernel's `paged_decode` function, or None (no compiler, a failed build, or switched off)."""
    if os.environ.get("TRITON_VLM_CPU_KERNEL", "1") == "0":
        return None
    path = library_path()
    if str(path) in _loaded:
        return _loaded[str(path)]
    fn = None
    try:
        if not path.exists():
            build(path)
        fn = ctypes.CDLL(str(path)).paged_decode
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU decode-attention kernel unavailable, using the torch path: %s", detail)
    _loaded[str(path)] = fn
    return fn


def paged_decode(fn, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 offsets: torch.Tensor, ctx: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, heads, dim] (fp32, contiguous) -> [n, heads, dim]; tables/offsets/ctx int32 (see SOURCE)."""
    n, heads, dim = q.shape
    _, kv_heads, bs, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), offsets.data_ptr(), ctx.data_ptr(),
       out.data_ptr(), n, heads, kv_heads, dim, bs, scale, torch.get_num_threads())
    return out
