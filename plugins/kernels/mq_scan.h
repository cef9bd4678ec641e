/* C ABI of the selective-scan CUDA kernels (no TensorRT dependency).
 *
 * Layout is mamba-ssm's selective_scan_fn, all tensors contiguous (row-major):
 *   u, delta, z, out: (batch, dim, length)      element type `dtype`
 *   B, C:             (batch, dstate, length)   element type `dtype`
 *   A:                (dim, dstate)             float32
 *   D, delta_bias:    (dim)                     float32
 *   initial_state, final_state: (batch, dim, dstate)  float32
 * Optional tensors (D, z, delta_bias, initial_state, final_state) are absent when NULL.
 * The recurrence and all accumulation run in float32 whatever `dtype` is.
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
#define MQ_SCAN_ABI_VERSION 1
#define MQ_SCAN_MAX_DSTATE 256

typedef enum
{
    MQ_SCAN_OK = 0,
    MQ_SCAN_ERR_INVALID_ARGUMENT = 1,
    MQ_SCAN_ERR_CUDA = 2
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
} mq_scan_params;

MQ_SCAN_API int mq_scan_abi_version(void);

/* Enqueues the forward scan on `stream`; returns an mq_scan_status. */
MQ_SCAN_API int mq_selective_scan_forward(mq_scan_params const* params, cudaStream_t stream);

/* Static description of a status code, for logs. */
MQ_SCAN_API char const* mq_scan_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* MQ_SCAN_H */
