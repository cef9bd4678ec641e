/* C ABI of the scan CUDA kernels (no TensorRT dependency): Mamba-1's selective scan and
 * Mamba-2's SSD scan. All tensors contiguous (row-major); optional tensors are absent when NULL;
 * the recurrence, the state and all accumulation run in float32 whatever `dtype` is.
 *
 * Selective scan (mq_scan_params), mamba-ssm's selective_scan_fn layout:
 *   u, delta, z, out: (batch, dim, length)      element type `dtype`
 *   B, C:             (batch, dstate, length)   element type `dtype`
 *   A:                (dim, dstate)             float32
 *   D, delta_bias:    (dim)                     float32
 *   initial_state, final_state: (batch, dim, dstate)  float32
 *
 * SSD scan (mq_ssd_params), mamba-ssm's mamba_chunk_scan_combined layout:
 *   x, z, out:        (batch, length, heads, headdim)   element type `dtype`
 *   dt:               (batch, length, heads)            element type `dtype`
 *   B, C:             (batch, length, ngroups, dstate)  element type `dtype`; head h reads group
 *                                                       h / (heads / ngroups)
 *   A, dt_bias:       (heads)                           float32
 *   D:                (heads), or (heads, headdim) when D_has_hdim   float32
 *   initial_state, final_state: (batch, heads, headdim, dstate)      float32
 */
#ifndef MQ_SCAN_H
#define MQ_SCAN_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Libraries build with hidden visibility; only this ABI is exported. */
#define MQ_SCAN_API __attribute__((visibility("default")))

/* Bumped whenever mq_scan_params or a signature changes; bindings check it. */
#define MQ_SCAN_ABI_VERSION 2
#define MQ_SCAN_MAX_DSTATE 256

typedef enum
{
    MQ_SCAN_OK = 0,
    MQ_SCAN_ERR_INVALID_ARGUMENT = 1,
    MQ_SCAN_ERR_CUDA = 2,
    MQ_SCAN_ERR_SHARED_MEMORY = 3 /* the device's shared memory per block is too small for this d_state */
} mq_scan_status;

typedef enum
{
    MQ_SCAN_FLOAT32 = 0,
    MQ_SCAN_FLOAT16 = 1
} mq_scan_dtype;

typedef struct
{
    void const* u;
    void const* delta;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* z;
    float const* delta_bias;
    float const* initial_state;
    void* out;
    float* final_state;
    int64_t batch;
    int64_t dim;
    int64_t length;
    int64_t dstate;
    int32_t dtype;          /* mq_scan_dtype */
    int32_t delta_softplus; /* nonzero: delta = softplus(delta + delta_bias) */
    int32_t reverse;        /* nonzero: the recurrence runs from the last step to the first */
} mq_scan_params;

typedef struct
{
    void const* x;
    void const* dt;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* z;
    float const* dt_bias;
    float const* initial_state;
    void* out;
    float* final_state;
    int64_t batch;
    int64_t length;
    int64_t heads;
    int64_t headdim;
    int64_t ngroups;
    int64_t dstate;
    float dt_min;           /* delta = clamp(delta, dt_min, dt_max) unless (dt_min, dt_max) = (0, inf) */
    float dt_max;
    int32_t dtype;          /* mq_scan_dtype */
    int32_t dt_softplus;    /* nonzero: delta = softplus(dt + dt_bias) */
    int32_t D_has_hdim;     /* nonzero: D is (heads, headdim) */
} mq_ssd_params;

MQ_SCAN_API int mq_scan_abi_version(void);

/* Enqueues the forward scan on `stream`; returns an mq_scan_status. */
MQ_SCAN_API int mq_selective_scan_forward(mq_scan_params const* params, cudaStream_t stream);

/* Enqueues the chunked SSD scan on `stream`; returns an mq_scan_status. */
MQ_SCAN_API int mq_ssd_scan_forward(mq_ssd_params const* params, cudaStream_t stream);

/* Static description of a status code, for logs. */
MQ_SCAN_API char const* mq_scan_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* MQ_SCAN_H */
