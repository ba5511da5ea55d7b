"""Native row pass: one kernel body, thin Metal (`mx.fast.metal_kernel`) and CUDA
(`mx.fast.cuda_kernel`) layers.

It replaces `rows.PortableRows` (same contract): per row of a chunk of masked logits `s`
(n, V) fp32, `stats` computes in one read the online max `m` and `S = sum exp(s - m)` (and
`Sz = sum exp(T (s - m))` for cross-entropy at T != 1); `grad` writes
`dz = a * exp(s - m) [+ b * exp(T (s - m))]`. The matmuls, the gathers at the teacher ids and
the sparse corrections stay in MLX. One dispatch covers one chunk (n rows x V), far below the
macOS command-buffer watchdog.

Never used without passing `selfcheck` against the portable path on this machine.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_distill.kernels.rows import RowStats

THREADS = 256  # per row in `stats` (a power of two: tree reduction)

# The bodies below only use these names, so one source serves both backends. MLX adds a Metal
# attribute to the generated signature when the body mentions it: the #defines are part of the
# body for that reason.
_METAL_PRELUDE = """
#define ROW ((int)threadgroup_position_in_grid.y)
#define TID ((int)thread_position_in_threadgroup.x)
#define NT ((int)threads_per_threadgroup.x)
#define GX ((int)thread_position_in_grid.x)
#define SHARED(name, n) threadgroup float name[n]
#define SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define EXPF(x) metal::exp(x)
#define NEG_INF (-INFINITY)
"""

_CUDA_PRELUDE = """
#define ROW ((int)blockIdx.y)
#define TID ((int)threadIdx.x)
#define NT ((int)blockDim.x)
#define GX ((int)(blockIdx.x * blockDim.x + threadIdx.x))
#define SHARED(name, n) __shared__ float name[n]
#define SYNC() __syncthreads()
#define EXPF(x) expf(x)
#define NEG_INF (-inf)
"""

# One threadgroup per row. Each thread keeps an online (max, sum) over its strided columns;
# -inf entries (the masked teacher ids) are skipped; a tree reduction merges the partials.
STATS_BODY = """
const int row = ROW;
const int tid = TID;
const int nt = NT;
const float T = temp[0];
const long base = (long)row * V;
float m = NEG_INF;
float S = 0.0f;
float Sz = 0.0f;
for (int i = tid; i < V; i += nt) {
  const float v = s[base + i];
  if (v > m) {
    const bool empty = (m == NEG_INF);
    S = (empty ? 0.0f : S * EXPF(m - v)) + 1.0f;
    if (WITH_Z) {
      Sz = (empty ? 0.0f : Sz * EXPF(T * (m - v))) + 1.0f;
    }
    m = v;
  } else if (v > NEG_INF) {
    S += EXPF(v - m);
    if (WITH_Z) {
      Sz += EXPF(T * (v - m));
    }
  }
}
SHARED(red_m, MAX_THREADS);
SHARED(red_s, MAX_THREADS);
SHARED(red_z, MAX_THREADS);
red_m[tid] = m;
red_s[tid] = S;
red_z[tid] = Sz;
SYNC();
for (int off = nt / 2; off > 0; off /= 2) {
  if (tid < off) {
    const float m1 = red_m[tid];
    const float m2 = red_m[tid + off];
    const float mn = m1 > m2 ? m1 : m2;
    const float f1 = (m1 == NEG_INF) ? 0.0f : EXPF(m1 - mn);
    const float f2 = (m2 == NEG_INF) ? 0.0f : EXPF(m2 - mn);
    red_s[tid] = red_s[tid] * f1 + red_s[tid + off] * f2;
    if (WITH_Z) {
      const float g1 = (m1 == NEG_INF) ? 0.0f : EXPF(T * (m1 - mn));
      const float g2 = (m2 == NEG_INF) ? 0.0f : EXPF(T * (m2 - mn));
      red_z[tid] = red_z[tid] * g1 + red_z[tid + off] * g2;
    }
    red_m[tid] = mn;
  }
  SYNC();
}
if (tid == 0) {
  const float mf = red_m[0];
  out_m[row] = (mf == NEG_INF) ? 0.0f : mf;
  out_s[row] = red_s[0];
  out_z[row] = red_z[0];
}
"""

# One thread per element: dz = a * exp(s - m) [+ b * exp(T (s - m))]; exp(-inf) = 0.
GRAD_BODY = """
const int col = GX;
const int row = ROW;
if (col < V) {
  const long i = (long)row * V + col;
  const float x = s[i] - m[row];
  float v = a[row] * EXPF(x);
  if (WITH_Z) {
    v += b[row] * EXPF(temp[0] * x);
  }
  dz[i] = v;
}
"""


def _available(backend: str) -> bool:
    if backend == "metal":
        return mx.metal.is_available()
    if backend == "cuda":
        return hasattr(mx, "cuda") and mx.cuda.is_available()
    return False


def native_backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU backend here, else None."""
    for backend in ("metal", "cuda"):
        if _available(backend):
            return backend
    return None


class NativeRows:
    """`PortableRows` contract on Metal or CUDA. fp32 logits only."""

    def __init__(self, backend: str):
        if not _available(backend):
            raise RuntimeError(f"no {backend} backend in this MLX build")
        self.name = backend
        if backend == "metal":
            make, prelude = mx.fast.metal_kernel, _METAL_PRELUDE
        else:
            make, prelude = mx.fast.cuda_kernel, _CUDA_PRELUDE
        self._stats = make(
            name="mlx_distill_row_stats",
            input_names=["s", "temp"],
            output_names=["out_m", "out_s", "out_z"],
            source=prelude + STATS_BODY,
        )
        self._grad = make(
            name="mlx_distill_row_grad",
            input_names=["s", "m", "a", "b", "temp"],
            output_names=["dz"],
            source=prelude + GRAD_BODY,
        )

    def stats(self, s: mx.array, temperature: float | None) -> RowStats:
        n, V = s.shape
        with_z = temperature is not None
        temp = mx.array([temperature if with_z else 1.0], dtype=mx.float32)
        m, S, Sz = self._stats(
            inputs=[s.astype(mx.float32), temp],
            template=[("V", V), ("WITH_Z", with_z), ("MAX_THREADS", THREADS)],
            grid=(THREADS, n, 1),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[(n,), (n,), (n,)],
            output_dtypes=[mx.float32] * 3,
        )
        return RowStats(m, S, Sz if with_z else None, (temp,))

    def grad(self, s: mx.array, st: RowStats, a: mx.array, b: mx.array | None) -> mx.array:
        n, V = s.shape
        (temp,) = st.cache
        with_z = b is not None
        (dz,) = self._grad(
            inputs=[
                s.astype(mx.float32),
                st.m,
                a.astype(mx.float32),
                (b if with_z else a).astype(mx.float32),
                temp,
            ],
            template=[("V", V), ("WITH_Z", with_z)],
            grid=(V, n, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[(n, V)],
            output_dtypes=[mx.float32],
        )
        return dz
