// Element conversions and activations shared by the scan kernels.
#pragma once

#include <cuda_fp16.h>

namespace mq_export_kernels
{

__device__ __forceinline__ float to_float(float v)
{
    return v;
}

__device__ __forceinline__ float to_float(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half from_float<__half>(float v)
{
    return __float2half_rn(v);
}

// Same threshold as torch.nn.functional.softplus.
__device__ __forceinline__ float softplus(float x)
{
    return x > 20.f ? x : log1pf(expf(x));
}

__device__ __forceinline__ float silu(float x)
{
    return x / (1.f + expf(-x));
}

} // namespace mq_export_kernels
