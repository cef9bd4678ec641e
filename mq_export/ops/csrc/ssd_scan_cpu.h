/* Fused CPU SSD scan (Mamba-2), float32: the interface shared by mq_export/ops/ssd_cpu_kernel.py
 * (ctypes) and native ONNX Runtime kernels. Semantics: mq_export.ops.ssd_scan.ssd_scan_reference,
 * contract: mq_export/ops/spec.py SSDScanSpec.
 *
 * Layouts, strides in elements: x, z, y: (b, l, h, p); dt: (b, l, h); B, C: (b, l, g, n) with g
 * dividing h; each with free strides. A, dt_bias: (h), D: (h) or (h, p) (D_has_hdim),
 * h0 and h_last: (b, h, p, n), all contiguous. Optional pointers (z, D, dt_bias, h0, h_last) may be
 * NULL. dt_max = INFINITY: no upper limit.
 *
 * Work: mq_ssd_scan_units(p) independent units (one batch element × one head each); callers run
 * disjoint ranges [unit_begin, unit_end) of them on any threads at once.
 */
#ifndef MQ_SSD_SCAN_CPU_H
#define MQ_SSD_SCAN_CPU_H
#include <stdint.h>

#define MQ_SSD_SCAN_ABI 1
#define MQ_SSD_SCAN_MAX_DSTATE 256

enum { MQ_SSD_OK = 0, MQ_SSD_BAD_SHAPE = 1, MQ_SSD_NO_MEMORY = 2 };

typedef struct {
    const float *x, *dt, *A, *B, *C, *D, *z, *dt_bias, *h0;
    float *y, *h_last;
    int64_t x_strides[4], z_strides[4], y_strides[4], dt_strides[3], B_strides[4], C_strides[4];
    int64_t batch, length, heads, headdim, groups, dstate;
    int32_t dt_softplus, D_has_hdim;
    float dt_min, dt_max;
} mq_ssd_scan_params;

int mq_ssd_scan_abi(void);
int64_t mq_ssd_scan_units(const mq_ssd_scan_params *p);
/* MQ_SSD_OK, or an error code (then the outputs of these units are undefined). */
int mq_ssd_scan(const mq_ssd_scan_params *p, int64_t unit_begin, int64_t unit_end);

#endif
