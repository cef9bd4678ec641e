/* Backward pass of the fused CPU selective scan (selective_scan_cpu.c): the gradients of
 * out = (Σ_n h_t·C_t + D·u_t) ⊙ SiLU(z_t),  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,
 * Δ = softplus?(delta + delta_bias), from a zero initial state, forward or reverse (`reverse`: the
 * recurrence visits the steps from the last to the first). Used by mq_export/ops/cpu_scan_grad.py
 * so that training through the scan costs O(b·l·d·n) arithmetic with the state kept in cache, not
 * the (b, l, d, n) tensors autograd would store and re-read.
 *
 * Layout: contiguous time-major tensors. u, delta, z, dout and the per-channel outputs du, ddelta,
 * dz: (b, l, d); B, C: (b, l, n); A: (d, n); D, delta_bias: (d). Per-unit partial sums, summed by
 * the caller: dB, dC: (blocks, b, l, n) with blocks = ceil(d / LANES) (each block of channels adds
 * its share); dA: (b, d, n), dD, ddelta_bias: (b, d).
 *
 * Work unit: one batch element × a block of LANES channels, as in the forward kernel. The forward
 * recurrence runs once to store the state at every TILE-th step; then tiles are revisited from the
 * last: the tile's states are recomputed from its checkpoint and the adjoint g (dL/dh) runs back
 * through them: g_s = C_s·dy_s + exp(Δ_{s+1} A)·g_{s+1}.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define MQ_X86 1
#endif

#define MQ_CPU_SCAN_GRAD_ABI 1
#define MQ_CPU_SCAN_GRAD_MAX_DSTATE 256
#define LANES 16
#define TILE 32

typedef struct {
    const float *u, *delta, *z, *A, *B, *C, *D, *delta_bias, *dout;
    float *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *ddelta_bias;
    int64_t batch, dim, length, dstate;
    int32_t delta_softplus, reverse;
} mq_cpu_scan_grad_params;

int mq_cpu_scan_grad_abi(void) { return MQ_CPU_SCAN_GRAD_ABI; }

int64_t mq_cpu_scan_grad_units(const mq_cpu_scan_grad_params *p) {
    return p->batch * ((p->dim + LANES - 1) / LANES);
}

static inline int64_t time_index(const mq_cpu_scan_grad_params *p, int64_t s) {
    return p->reverse ? p->length - 1 - s : s;
}

/* Δ after bias and softplus, and dΔ/d(delta): torch's softplus (threshold 20) and its slope. */
static inline float discretize(const mq_cpu_scan_grad_params *p, float v, float *slope) {
    if (!p->delta_softplus) { *slope = 1.0f; return v; }
    if (v > 20.0f) { *slope = 1.0f; return v; }
    *slope = 1.0f / (1.0f + expf(-v));
    return log1pf(expf(v));
}

/* Scan steps [s0, s0 + steps) from the state in states[0] (n × LANES), writing the state after
 * step s to states[s + 1], its decays exp(Δ·A) to decays[s], Δ to dt[s]. */
static void run_tile(const mq_cpu_scan_grad_params *p, int64_t b, int64_t d0, int lanes, int64_t s0, int64_t steps,
                     const float *a, const float *bias, float *states, float *decays, float (*dt)[LANES],
                     float (*slope)[LANES]) {
    const int64_t n = p->dstate, dim = p->dim;
    for (int64_t s = 0; s < steps; ++s) {
        const int64_t t = time_index(p, s0 + s);
        const float *delta_t = p->delta + (b * p->length + t) * dim + d0;
        const float *u_t = p->u + (b * p->length + t) * dim + d0;
        const float *B_t = p->B + (b * p->length + t) * n;
        float du[LANES];
        for (int j = 0; j < lanes; ++j) {
            dt[s][j] = discretize(p, delta_t[j] + bias[j], &slope[s][j]);
            du[j] = dt[s][j] * u_t[j];
        }
        const float *prev = states + s * n * LANES;
        float *next = states + (s + 1) * n * LANES, *decay = decays + s * n * LANES;
        for (int64_t k = 0; k < n; ++k)
            for (int j = 0; j < lanes; ++j) {
                decay[k * LANES + j] = expf(dt[s][j] * a[k * LANES + j]);
                next[k * LANES + j] = decay[k * LANES + j] * prev[k * LANES + j] + du[j] * B_t[k];
            }
    }
}

static int grad_block(const mq_cpu_scan_grad_params *p, int64_t b, int64_t d0, int lanes) {
    const int64_t n = p->dstate, dim = p->dim, length = p->length;
    const int64_t tiles = (length + TILE - 1) / TILE, block = d0 / LANES;
    float *a = calloc(n * LANES, sizeof(float)), *g = calloc(n * LANES, sizeof(float));
    float *dA = calloc(n * LANES, sizeof(float));
    float *checkpoints = calloc((tiles + 1) * n * LANES, sizeof(float));   /* state before each tile */
    float *states = malloc(sizeof(float) * (TILE + 1) * n * LANES), *decays = malloc(sizeof(float) * TILE * n * LANES);
    if (!a || !g || !dA || !checkpoints || !states || !decays) {
        free(a); free(g); free(dA); free(checkpoints); free(states); free(decays);
        return 2;
    }
    float bias[LANES] = {0}, skip[LANES] = {0}, dskip[LANES] = {0}, dbias[LANES] = {0};
    float dt[TILE][LANES], slope[TILE][LANES];
    for (int j = 0; j < lanes; ++j) {
        if (p->delta_bias) bias[j] = p->delta_bias[d0 + j];
        if (p->D) skip[j] = p->D[d0 + j];
        for (int64_t k = 0; k < n; ++k) a[k * LANES + j] = p->A[(d0 + j) * n + k];
    }
    /* forward once: the state at each tile's start */
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t s0 = tile * TILE, steps = length - s0 < TILE ? length - s0 : TILE;
        memcpy(states, checkpoints + tile * n * LANES, sizeof(float) * n * LANES);
        run_tile(p, b, d0, lanes, s0, steps, a, bias, states, decays, dt, slope);
        memcpy(checkpoints + (tile + 1) * n * LANES, states + steps * n * LANES, sizeof(float) * n * LANES);
    }
    float *dB = p->dB + (block * p->batch + b) * length * n, *dC = p->dC + (block * p->batch + b) * length * n;
    for (int64_t tile = tiles - 1; tile >= 0; --tile) {
        const int64_t s0 = tile * TILE, steps = length - s0 < TILE ? length - s0 : TILE;
        memcpy(states, checkpoints + tile * n * LANES, sizeof(float) * n * LANES);
        run_tile(p, b, d0, lanes, s0, steps, a, bias, states, decays, dt, slope);
        for (int64_t s = steps - 1; s >= 0; --s) {
            const int64_t t = time_index(p, s0 + s), row = (b * length + t) * dim + d0;
            const float *u_t = p->u + row, *dout_t = p->dout + row;
            const float *B_t = p->B + (b * length + t) * n, *C_t = p->C + (b * length + t) * n;
            const float *h = states + (s + 1) * n * LANES, *h_prev = states + s * n * LANES;
            float dy[LANES], du[LANES], ddt[LANES] = {0};
            if (p->z) {
                const float *z_t = p->z + row;
                float y[LANES];
                for (int j = 0; j < lanes; ++j) y[j] = skip[j] * u_t[j];
                for (int64_t k = 0; k < n; ++k)
                    for (int j = 0; j < lanes; ++j) y[j] += h[k * LANES + j] * C_t[k];
                for (int j = 0; j < lanes; ++j) {
                    const float sig = 1.0f / (1.0f + expf(-z_t[j]));
                    p->dz[row + j] = dout_t[j] * y[j] * sig * (1.0f + z_t[j] * (1.0f - sig));
                    dy[j] = dout_t[j] * z_t[j] * sig;
                }
            } else {
                for (int j = 0; j < lanes; ++j) dy[j] = dout_t[j];
            }
            for (int j = 0; j < lanes; ++j) {
                dskip[j] += dy[j] * u_t[j];
                du[j] = dy[j] * skip[j];
            }
            float *dB_t = dB + t * n, *dC_t = dC + t * n;
            for (int64_t k = 0; k < n; ++k) {
                float *g_k = g + k * LANES;
                const float *h_k = h + k * LANES, *hp_k = h_prev + k * LANES, *a_k = a + k * LANES;
                const float *decay_k = decays + (s * n + k) * LANES;
                float dc = 0.0f, db = 0.0f;
                for (int j = 0; j < lanes; ++j) {
                    dc += dy[j] * h_k[j];
                    g_k[j] += dy[j] * C_t[k];
                    const float decay = decay_k[j], carried = g_k[j] * hp_k[j] * decay;
                    ddt[j] += carried * a_k[j] + g_k[j] * B_t[k] * u_t[j];
                    dA[k * LANES + j] += carried * dt[s][j];
                    db += g_k[j] * dt[s][j] * u_t[j];
                    du[j] += g_k[j] * dt[s][j] * B_t[k];
                    g_k[j] *= decay;
                }
                dC_t[k] = dc;
                dB_t[k] = db;
            }
            for (int j = 0; j < lanes; ++j) {
                const float d_raw = ddt[j] * slope[s][j];
                p->ddelta[row + j] = d_raw;
                dbias[j] += d_raw;
                p->du[row + j] = du[j];
            }
        }
    }
    for (int j = 0; j < lanes; ++j) {
        p->dD[b * dim + d0 + j] = dskip[j];
        p->ddelta_bias[b * dim + d0 + j] = dbias[j];
        for (int64_t k = 0; k < n; ++k) p->dA[(b * dim + d0 + j) * n + k] = dA[k * LANES + j];
    }
    free(a); free(g); free(dA); free(checkpoints); free(states); free(decays);
    return 0;
}

/* Units [unit_begin, unit_end) of mq_cpu_scan_grad_units(p); 0 on success, 1 for a d_state outside
 * [1, MAX_DSTATE], 2 when memory runs out. */
int mq_cpu_scan_grad(const mq_cpu_scan_grad_params *p, int64_t unit_begin, int64_t unit_end) {
    if (p->dstate < 1 || p->dstate > MQ_CPU_SCAN_GRAD_MAX_DSTATE) return 1;
#ifdef MQ_X86
    const unsigned int csr = _mm_getcsr();   /* flush subnormal states for this call only */
    _mm_setcsr(csr | 0x8040);
#endif
    int status = 0;
    const int64_t blocks = (p->dim + LANES - 1) / LANES;
    for (int64_t unit = unit_begin; unit < unit_end && !status; ++unit) {
        const int64_t b = unit / blocks, d0 = (unit % blocks) * LANES;
        status = grad_block(p, b, d0, p->dim - d0 >= LANES ? LANES : (int)(p->dim - d0));
    }
#ifdef MQ_X86
    _mm_setcsr(csr);
#endif
    return status;
}
