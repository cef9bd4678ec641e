/* Fused CPU selective scan, float32, the semantics of mq_export.scan.selective_scan_reference.
 *
 * Time-major layout: u, delta, z and y are (b, l, d) with unit channel stride (the layout the
 * model's Linear layers produce, so no transposed copies), B and C are (b, l, n) with unit state
 * stride; batch and step strides are free. A: (d, n); D, delta_bias: (d); h0, h_last: (b, d, n),
 * contiguous. Optional pointers may be NULL.
 *
 * Work unit: one batch element × a block of LANES channels, vectorized across the channels. The
 * state h (d_state × LANES) stays in L1 for the whole sequence, so memory traffic is
 * O(b·l·(d + n)) instead of the O(b·l·d·n) state slabs a tensor-at-a-time scan writes and reads
 * back. Per tile of steps, Δ (softplus), Δ·u and the SiLU gate are computed in their own loops;
 * the recurrence loop holds only the state update. Compiled at run time by mq_export/cpu_kernel.py
 * with -O3 -ffast-math, which vectorizes every loop here (libm's expf/log1pf through libmvec).
 */
#include <math.h>
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define MQ_X86 1
#endif

#define MQ_CPU_SCAN_ABI 2
#define MQ_CPU_SCAN_MAX_DSTATE 256
#define LANES 16
#define TILE 64

typedef struct {
    const float *u, *delta, *z, *A, *B, *C, *D, *delta_bias, *h0;
    float *y, *h_last;
    int64_t u_sb, u_st, delta_sb, delta_st, z_sb, z_st, B_sb, B_st, C_sb, C_st;   /* y: contiguous */
    int64_t batch, dim, length, dstate;
    int32_t delta_softplus;
} mq_cpu_scan_params;

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

/* Always inlined, so the call with lanes == LANES compiles to fixed-width vector code. */
static inline __attribute__((always_inline)) void scan_block(const mq_cpu_scan_params *p, int64_t b,
                                                             int64_t d0, const int lanes) {
    const int64_t n = p->dstate, dim = p->dim;
    float h[MQ_CPU_SCAN_MAX_DSTATE][LANES], a[MQ_CPU_SCAN_MAX_DSTATE][LANES];
    float bias[LANES] = {0}, skip[LANES] = {0};
    float dt[TILE][LANES], du[TILE][LANES], acc[TILE][LANES];
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
        for (int64_t t = 0; t < steps; ++t) {
            const float *delta_t = p->delta + b * p->delta_sb + (t0 + t) * p->delta_st + d0;
            const float *u_t = p->u + b * p->u_sb + (t0 + t) * p->u_st + d0;
            for (int j = 0; j < lanes; ++j) {
                float v = delta_t[j] + bias[j];
                /* torch's softplus, threshold 20 */
                if (p->delta_softplus) v = v > 20.0f ? v : log1pf(expf(v));
                dt[t][j] = v;
                du[t][j] = v * u_t[j];
            }
        }
        for (int64_t t = 0; t < steps; ++t) {
            const float *B_t = p->B + b * p->B_sb + (t0 + t) * p->B_st;
            const float *C_t = p->C + b * p->C_sb + (t0 + t) * p->C_st;
            float sum[LANES] = {0};
            for (int64_t k = 0; k < n; ++k) {
                const float bk = B_t[k], ck = C_t[k];
                for (int j = 0; j < lanes; ++j) {
                    h[k][j] = decay_exp(dt[t][j] * a[k][j]) * h[k][j] + du[t][j] * bk;
                    sum[j] += h[k][j] * ck;
                }
            }
            for (int j = 0; j < lanes; ++j) acc[t][j] = sum[j];
        }
        for (int64_t t = 0; t < steps; ++t) {
            const float *u_t = p->u + b * p->u_sb + (t0 + t) * p->u_st + d0;
            float *y_t = p->y + (b * p->length + t0 + t) * dim + d0;
            if (p->z) {
                const float *z_t = p->z + b * p->z_sb + (t0 + t) * p->z_st + d0;
                for (int j = 0; j < lanes; ++j)
                    y_t[j] = (acc[t][j] + skip[j] * u_t[j]) * z_t[j] / (1.0f + expf(-z_t[j]));
            } else {
                for (int j = 0; j < lanes; ++j) y_t[j] = acc[t][j] + skip[j] * u_t[j];
            }
        }
    }
    if (p->h_last)
        for (int64_t k = 0; k < n; ++k)
            for (int j = 0; j < lanes; ++j) p->h_last[(b * dim + d0 + j) * n + k] = h[k][j];
}

int64_t mq_cpu_scan_units(const mq_cpu_scan_params *p) {
    return p->batch * ((p->dim + LANES - 1) / LANES);
}

/* Units [unit_begin, unit_end) of mq_cpu_scan_units(p); callers split the range across threads. */
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
