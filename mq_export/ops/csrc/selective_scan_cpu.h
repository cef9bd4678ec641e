/* Interface of the fused CPU selective scan (selective_scan_cpu.c), shared by its two callers:
 * mq_export/ops/cpu_kernel.py (ctypes mirror of the struct: keep the two in step and bump the ABI
 * on any change) and the ONNX Runtime custom op (ort_scan_ops.cc).
 *
 * Layout is free: every (b, l, d)-shaped tensor (u, delta, z, y) has a batch, a step and a channel
 * stride, B and C a batch, a step and a state stride, all in elements. PyTorch passes the model's
 * time-major tensors (unit channel stride); ONNX Runtime passes the op's (b, d, l) tensors (unit
 * step stride). A: (d, n); D, delta_bias: (d); h0, h_last: (b, d, n), contiguous. Optional
 * pointers may be NULL.
 */
#ifndef MQ_SELECTIVE_SCAN_CPU_H
#define MQ_SELECTIVE_SCAN_CPU_H

#include <stdint.h>

#define MQ_CPU_SCAN_ABI 4
#define MQ_CPU_SCAN_MAX_DSTATE 256

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const float *u, *delta, *z, *A, *B, *C, *D, *delta_bias, *h0;
    float *y, *h_last;
    int64_t u_sb, u_st, u_sd, delta_sb, delta_st, delta_sd, z_sb, z_st, z_sd, y_sb, y_st, y_sd;
    int64_t B_sb, B_st, B_sn, C_sb, C_st, C_sn;
    int64_t batch, dim, length, dstate;
    int32_t delta_softplus;
    int32_t reverse;   /* the recurrence runs from the last step to the first */
} mq_cpu_scan_params;

int mq_cpu_scan_abi(void);
/* Number of independent work units (batch element × block of channels). */
int64_t mq_cpu_scan_units(const mq_cpu_scan_params *p);
/* Units [unit_begin, unit_end); callers split the range across threads. 0 on success, 1 when
 * dstate is outside [1, MQ_CPU_SCAN_MAX_DSTATE]. */
int mq_cpu_scan(const mq_cpu_scan_params *p, int64_t unit_begin, int64_t unit_end);

#ifdef __cplusplus
}
#endif

#endif
