/* Fused CPU selective scan, float32, the semantics of mq_export.scan.selective_scan_reference.
 * With reverse set, the recurrence visits the steps from the last to the first (step s of the
 * scan reads time index l-1-s); buffers and y are still addressed by time index.
 *
 * Layout and interface: selective_scan_cpu.h (every tensor strided, so PyTorch's time-major
 * tensors and ONNX Runtime's (b, d, l) ones are both read in place).
 *
 * Work unit: one batch element × a block of LANES channels, vectorized across the channels. The
 * state h (d_state × LANES) stays in L1 for the whole sequence, so memory traffic is
 * O(b·l·(d + n)) instead of the O(b·l·d·n) state slabs a tensor-at-a-time scan writes and reads
 * back. Per tile of steps, u, Δ and z are copied into time-major tiles (so every later loop runs
 * over unit-stride lanes whatever the caller's layout), Δ (softplus), Δ·u and the SiLU gate are
 * computed in their own loops and the recurrence loop holds only the state update. Compiled at
 * run time (mq_export/ops/cpu_kernel.py, mq_export/runtime/ort_native.py) with -O3 -ffast-math,
 * which vectorizes every loop here (libm's expf/log1pf through libmvec) except the SiLU gate's.
 */
#include "selective_scan_cpu.h"

#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define MQ_X86 1
#endif

#define LANES 16
#define TILE 64

#if defined(__GNUC__) && !defined(__clang__)
#if defined(__AVX512F__)
/* GCC's -march=native prefers 256-bit vectors; the state update is compute-bound and per lane, so
 * 512-bit vectors do the same arithmetic in half the instructions (results bit-identical). */
#pragma GCC target("prefer-vector-width=512")
#endif
#define SCALAR_LOOP __attribute__((noinline, optimize("no-tree-vectorize")))
#else
#define SCALAR_LOOP __attribute__((noinline))
#endif

int mq_cpu_scan_abi(void) { return MQ_CPU_SCAN_ABI; }

/* exp for the decays exp(Δ·A), inlined so the state update vectorizes without a libm call per
 * state row (a call clobbers every vector register): e^x = 2^k · e^r with k = round(x / ln 2),
 * r = x − k·ln 2 (split constant), e^r by its degree-7 Taylor polynomial (|r| ≤ 0.35, relative
 * error < 1e-8). x is clamped to [−87, 88], where 2^k stays a normal float. */
static inline float decay_exp(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float k = floorf(x * 1.44269504f + 0.5f);
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)k + 127) << 23};
    return p * scale.f;
}

/* The time index the scan's step s reads and writes. */
static inline int64_t time_index(const mq_cpu_scan_params *p, int64_t s) {
    return p->reverse ? p->length - 1 - s : s;
}

/* Steps [t0, t0 + steps) of lanes [0, lanes) of a (b, l, d)-shaped tensor (x: this batch element's
 * first channel of the block; st, sd: step and channel strides) into tile[step][lane], or back. */
static inline __attribute__((always_inline)) void load_tile(float tile[TILE][LANES], const float *x, int64_t st,
                                                            int64_t sd, const mq_cpu_scan_params *p, int64_t t0,
                                                            int64_t steps, const int lanes) {
    if (sd == 1) {
        for (int64_t t = 0; t < steps; ++t)
            for (int j = 0; j < lanes; ++j) tile[t][j] = x[time_index(p, t0 + t) * st + j];
    } else {
        for (int j = 0; j < lanes; ++j)
            for (int64_t t = 0; t < steps; ++t) tile[t][j] = x[time_index(p, t0 + t) * st + j * sd];
    }
}

static inline __attribute__((always_inline)) void store_tile(float *x, int64_t st, int64_t sd,
                                                             float tile[TILE][LANES], const mq_cpu_scan_params *p,
                                                             int64_t t0, int64_t steps, const int lanes) {
    if (sd == 1) {
        for (int64_t t = 0; t < steps; ++t)
            for (int j = 0; j < lanes; ++j) x[time_index(p, t0 + t) * st + j] = tile[t][j];
    } else {
        for (int j = 0; j < lanes; ++j)
            for (int64_t t = 0; t < steps; ++t) x[time_index(p, t0 + t) * st + j * sd] = tile[t][j];
    }
}

/* y ← y · SiLU(z) over a tile with libm's scalar expf and a true division, as this kernel always
 * computed the gate: the loop stays scalar (the vectorized form, libmvec's expf and a reciprocal
 * estimate, differs in the last bits and would change every result), one call per tile. */
static SCALAR_LOOP void silu_gate_tile(float y[TILE][LANES], float z[TILE][LANES], int64_t steps, const int lanes) {
    for (int64_t t = 0; t < steps; ++t)
        for (int j = 0; j < lanes; ++j) y[t][j] = y[t][j] * z[t][j] / (1.0f + expf(-z[t][j]));
}

/* Always inlined, so the call with lanes == LANES compiles to fixed-width vector code. */
static inline __attribute__((always_inline)) void scan_block(const mq_cpu_scan_params *p, int64_t b,
                                                             int64_t d0, const int lanes) {
    const int64_t n = p->dstate, dim = p->dim;
    float h[MQ_CPU_SCAN_MAX_DSTATE][LANES], a[MQ_CPU_SCAN_MAX_DSTATE][LANES];
    float bias[LANES] = {0}, skip[LANES] = {0};
    float dt[TILE][LANES], u[TILE][LANES], du[TILE][LANES], z[TILE][LANES], acc[TILE][LANES];
    const float *u_b = p->u + b * p->u_sb + d0 * p->u_sd;
    const float *delta_b = p->delta + b * p->delta_sb + d0 * p->delta_sd;
    const float *z_b = p->z ? p->z + b * p->z_sb + d0 * p->z_sd : 0;
    float *y_b = p->y + b * p->y_sb + d0 * p->y_sd;
    for (int j = 0; j < lanes; ++j) {
        if (p->delta_bias) bias[j] = p->delta_bias[d0 + j];
        if (p->D) skip[j] = p->D[d0 + j];
    }
    for (int64_t k = 0; k < n; ++k)
        for (int j = 0; j < lanes; ++j) {
            a[k][j] = p->A[(d0 + j) * n + k];
            h[k][j] = p->h0 ? p->h0[(b * dim + d0 + j) * n + k] : 0.0f;
        }
    for (int64_t t0 = 0; t0 < p->length; t0 += TILE) {
        const int64_t steps = p->length - t0 < TILE ? p->length - t0 : TILE;
        load_tile(dt, delta_b, p->delta_st, p->delta_sd, p, t0, steps, lanes);
        load_tile(u, u_b, p->u_st, p->u_sd, p, t0, steps, lanes);
        for (int64_t t = 0; t < steps; ++t) {
            for (int j = 0; j < lanes; ++j) {
                float v = dt[t][j] + bias[j];
                /* torch's softplus, threshold 20 */
                if (p->delta_softplus) v = v > 20.0f ? v : log1pf(expf(v));
                dt[t][j] = v;
                du[t][j] = v * u[t][j];
            }
        }
        for (int64_t t = 0; t < steps; ++t) {
            const float *B_t = p->B + b * p->B_sb + time_index(p, t0 + t) * p->B_st;
            const float *C_t = p->C + b * p->C_sb + time_index(p, t0 + t) * p->C_st;
            float sum[LANES] = {0};
            for (int64_t k = 0; k < n; ++k) {
                const float bk = B_t[k * p->B_sn], ck = C_t[k * p->C_sn];
                for (int j = 0; j < lanes; ++j) {
                    h[k][j] = decay_exp(dt[t][j] * a[k][j]) * h[k][j] + du[t][j] * bk;
                    sum[j] += h[k][j] * ck;
                }
            }
            for (int j = 0; j < lanes; ++j) acc[t][j] = sum[j];
        }
        for (int64_t t = 0; t < steps; ++t)
            for (int j = 0; j < lanes; ++j) acc[t][j] = acc[t][j] + skip[j] * u[t][j];
        if (z_b) {
            load_tile(z, z_b, p->z_st, p->z_sd, p, t0, steps, lanes);
            silu_gate_tile(acc, z, steps, lanes);
        }
        store_tile(y_b, p->y_st, p->y_sd, acc, p, t0, steps, lanes);
    }
    if (p->h_last)
        for (int64_t k = 0; k < n; ++k)
            for (int j = 0; j < lanes; ++j) p->h_last[(b * dim + d0 + j) * n + k] = h[k][j];
}

int64_t mq_cpu_scan_units(const mq_cpu_scan_params *p) {
    return p->batch * ((p->dim + LANES - 1) / LANES);
}

int mq_cpu_scan(const mq_cpu_scan_params *p, int64_t unit_begin, int64_t unit_end) {
    if (p->dstate < 1 || p->dstate > MQ_CPU_SCAN_MAX_DSTATE) return 1;
#ifdef MQ_X86
    /* Decaying states become subnormal, which x86 handles ~100x slower; flush them to zero for
     * this call only (FTZ/DAZ), restoring the caller's floating-point mode after. */
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    const int64_t blocks = (p->dim + LANES - 1) / LANES;
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t b = unit / blocks, d0 = (unit % blocks) * LANES;
        if (p->dim - d0 >= LANES) scan_block(p, b, d0, LANES);
        else scan_block(p, b, d0, (int)(p->dim - d0));
    }
#ifdef MQ_X86
    _mm_setcsr(csr);
#endif
    return 0;
}
