/* Fused CPU SSD scan (Mamba-2), float32; interface and layouts in ssd_scan_cpu.h.
 *
 * One unit is one (batch element, head): its state h (headdim × d_state, row-major) stays in
 * L1/L2 for the whole sequence, so memory traffic is O(b·l·h·(p + n)) rather than the state slabs
 * a tensor-at-a-time scan writes and reads back. Per step the decay exp(Δ·A) is one scalar per
 * head, so the update h = decay·h + (Δ·x) ⊗ B and the read-out y = h·C are one fused pass over the
 * state with d_state contiguous innermost, which -O3 -ffast-math vectorizes. Per tile of steps the
 * strided per-step inputs (Δ, Δ·x, B, C) are first gathered into contiguous buffers.
 */
#include "ssd_scan_cpu.h"

#include <math.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define MQ_X86 1
#endif

#define TILE 32

int mq_ssd_scan_abi(void) { return MQ_SSD_SCAN_ABI; }

int64_t mq_ssd_scan_units(const mq_ssd_scan_params *p) { return p->batch * p->heads; }

typedef struct {            /* per-thread scratch, sized for one tile */
    float *state, *dx, *Bt, *Ct, *acc, *decay;
} scratch;

static void scan_unit(const mq_ssd_scan_params *p, int64_t b, int64_t head, const scratch *s) {
    const int64_t P = p->headdim, N = p->dstate, L = p->length;
    const int64_t group = head / (p->heads / p->groups);
    const float a = p->A[head], bias = p->dt_bias ? p->dt_bias[head] : 0.0f;
    const float *x = p->x + b * p->x_strides[0] + head * p->x_strides[2];
    const float *dt = p->dt + b * p->dt_strides[0] + head * p->dt_strides[2];
    const float *B = p->B + b * p->B_strides[0] + group * p->B_strides[2];
    const float *C = p->C + b * p->C_strides[0] + group * p->C_strides[2];
    const float *z = p->z ? p->z + b * p->z_strides[0] + head * p->z_strides[2] : NULL;
    float *y = p->y + b * p->y_strides[0] + head * p->y_strides[2];
    const int64_t xs = p->x_strides[3], zs = p->z_strides[3], ys = p->y_strides[3];
    float *state = s->state;
    const int64_t state_offset = (b * p->heads + head) * P * N;
    for (int64_t i = 0; i < P * N; ++i) state[i] = p->h0 ? p->h0[state_offset + i] : 0.0f;

    for (int64_t t0 = 0; t0 < L; t0 += TILE) {
        const int64_t steps = L - t0 < TILE ? L - t0 : TILE;
        for (int64_t t = 0; t < steps; ++t) {
            const int64_t step = t0 + t;
            float delta = dt[step * p->dt_strides[1]] + bias;
            /* torch's softplus, threshold 20 */
            if (p->dt_softplus) delta = delta > 20.0f ? delta : log1pf(expf(delta));
            delta = fminf(fmaxf(delta, p->dt_min), p->dt_max);
            s->decay[t] = expf(delta * a);
            for (int64_t i = 0; i < P; ++i) s->dx[t * P + i] = delta * x[step * p->x_strides[1] + i * xs];
            for (int64_t k = 0; k < N; ++k) {
                s->Bt[t * N + k] = B[step * p->B_strides[1] + k * p->B_strides[3]];
                s->Ct[t * N + k] = C[step * p->C_strides[1] + k * p->C_strides[3]];
            }
        }
        for (int64_t t = 0; t < steps; ++t) {
            const float decay = s->decay[t];
            const float *restrict Bt = s->Bt + t * N, *restrict Ct = s->Ct + t * N;
            for (int64_t i = 0; i < P; ++i) {
                float *restrict row = state + i * N;
                const float dx = s->dx[t * P + i];
                float sum = 0.0f;
                for (int64_t k = 0; k < N; ++k) {
                    row[k] = decay * row[k] + dx * Bt[k];
                    sum += row[k] * Ct[k];
                }
                s->acc[t * P + i] = sum;
            }
        }
        for (int64_t t = 0; t < steps; ++t) {
            const int64_t step = t0 + t;
            for (int64_t i = 0; i < P; ++i) {
                const float xi = x[step * p->x_strides[1] + i * xs];
                float out = s->acc[t * P + i];
                if (p->D) out += (p->D_has_hdim ? p->D[head * P + i] : p->D[head]) * xi;
                if (z) {
                    const float zi = z[step * p->z_strides[1] + i * zs];
                    out *= zi / (1.0f + expf(-zi));
                }
                y[step * p->y_strides[1] + i * ys] = out;
            }
        }
    }
    if (p->h_last)
        for (int64_t i = 0; i < P * N; ++i) p->h_last[state_offset + i] = state[i];
}

int mq_ssd_scan(const mq_ssd_scan_params *p, int64_t unit_begin, int64_t unit_end) {
    if (p->dstate < 1 || p->dstate > MQ_SSD_SCAN_MAX_DSTATE || p->headdim < 1 || p->groups < 1 ||
        p->heads % p->groups)
        return MQ_SSD_BAD_SHAPE;
    const int64_t P = p->headdim, N = p->dstate;
    float *memory = malloc(sizeof(float) * (size_t)(P * N + TILE * (2 * P + 2 * N + 1)));
    if (!memory) return MQ_SSD_NO_MEMORY;
    const scratch s = {memory, memory + P * N, memory + P * N + TILE * P, memory + P * N + TILE * (P + N),
                       memory + P * N + TILE * (P + 2 * N), memory + P * N + TILE * (2 * P + 2 * N)};
#ifdef MQ_X86
    /* Decaying states become subnormal, which x86 handles ~100x slower; flush them to zero for
     * this call only (FTZ/DAZ), restoring the caller's floating-point mode after. */
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) scan_unit(p, unit / p->heads, unit % p->heads, &s);
#ifdef MQ_X86
    _mm_setcsr(csr);
#endif
    free(memory);
    return MQ_SSD_OK;
}
