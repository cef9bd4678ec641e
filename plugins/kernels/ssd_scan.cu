// Chunked SSD (Mamba-2) scan forward kernel, the matmul formulation of the Mamba-2 paper.
//
// Work split: one block of kThreads threads owns one (batch, head) and a tile of kHeadTile of
// the head's headdim channels, and walks the sequence in chunks of kChunk = 32 steps (one warp
// wide) carrying that tile's state (kHeadTile x dstate, float32) in shared memory. With the
// decay a_t = Δ_t A of the head (a scalar per step), per chunk:
//   within the chunk  y_t += Σ_{s≤t} (C_t·B_s) exp(a_{s+1} + … + a_t) Δ_s x_s
//   from the carry    y_t += exp(a_0 + … + a_t) C_t·h
//   carry update      h    = exp(a_0 + … + a_31) h + Σ_s exp(a_{s+1} + … + a_31) Δ_s x_s ⊗ B_s
// The exponents are sums over the steps between s and t, never differences of running sums
// (which lose precision as the sums grow). Steps past the end have Δ = 0: identity maps, so the
// carry after the last chunk is the final state. B, C and x of the chunk are staged in shared
// memory once and reused by every thread; rows are padded by one word against bank conflicts.
// Everything is float32 inside; x, dt, B, C, z and y may be float16 in memory.
#include "device_math.cuh"
#include "mq_scan.h"

#include <climits>
#include <cmath>

namespace
{

using namespace mq_export_kernels;

constexpr int kWarpSize = 32;
constexpr int kChunk = kWarpSize;
constexpr int kThreads = 256;
// Head tiles, widest first: the widest whose shared memory fits the device is launched.
constexpr int kWideHeadTile = 32;
constexpr int kNarrowHeadTile = 16;

// Shared memory of one block, in floats, in this order.
struct SsdSharedLayout
{
    int state;      // [head_tile][dstate + 1]
    int B;          // [kChunk][dstate + 1]
    int C;          // [kChunk][dstate + 1]
    int x;          // [kChunk][head_tile]
    int weights;    // [kChunk][kChunk + 1]: (C_t·B_s) exp(a_{s+1..t}) Δ_s, zero for s > t
    int decay;      // [kChunk]: a_t = Δ_t A
    int delta;      // [kChunk]: Δ_t
    int from_start; // [kChunk]: exp(a_0 + … + a_t)
    int to_end;     // [kChunk]: exp(a_{t+1} + … + a_31) Δ_t
    int total;

    __host__ __device__ SsdSharedLayout(int head_tile, int dstate)
    {
        int const row = dstate + 1;
        state = 0;
        B = state + head_tile * row;
        C = B + kChunk * row;
        x = C + kChunk * row;
        weights = x + kChunk * head_tile;
        decay = weights + kChunk * (kChunk + 1);
        delta = decay + kChunk;
        from_start = delta + kChunk;
        to_end = from_start + kChunk;
        total = to_end + kChunk;
    }
};

__device__ __forceinline__ float warp_inclusive_sum(float value, int lane)
{
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2)
    {
        float const previous = __shfl_up_sync(0xffffffffu, value, offset);
        if (lane >= offset)
        {
            value += previous;
        }
    }
    return value;
}

template <typename T, int kHeadTile>
__global__ void __launch_bounds__(kThreads)
    ssd_scan_forward_kernel(mq_ssd_params p, int64_t head_tiles, bool limit_dt)
{
    static_assert(kThreads % kHeadTile == 0 && kChunk * kHeadTile % kThreads == 0,
        "each thread owns one channel's outputs at whole steps of a chunk");
    constexpr int kOutputsPerThread = kChunk * kHeadTile / kThreads;
    constexpr int kStepStride = kThreads / kHeadTile;
    // The carried state is updated kStateBatch entries per thread at a time: independent
    // accumulators, one read of each step's weight for all of them.
    constexpr int kStateBatch = 4;
    extern __shared__ float shared[];

    int const dstate = static_cast<int>(p.dstate);
    int const row = dstate + 1;
    SsdSharedLayout const layout(kHeadTile, dstate);
    float* const state = shared + layout.state;
    float* const B_tile = shared + layout.B;
    float* const C_tile = shared + layout.C;
    float* const x_tile = shared + layout.x;
    float* const weights = shared + layout.weights;
    float* const decay = shared + layout.decay;
    float* const delta = shared + layout.delta;
    float* const from_start = shared + layout.from_start;
    float* const to_end = shared + layout.to_end;

    int const tid = threadIdx.x;
    int const lane = tid % kWarpSize;
    int64_t const tile = blockIdx.x % head_tiles;
    int64_t const head = (blockIdx.x / head_tiles) % p.heads;
    int64_t const batch = blockIdx.x / head_tiles / p.heads;
    int64_t const group = head / (p.heads / p.ngroups);
    int64_t const channel0 = tile * kHeadTile;
    int const tile_width = static_cast<int>(min(static_cast<int64_t>(kHeadTile), p.headdim - channel0));
    int64_t const state_offset = ((batch * p.heads + head) * p.headdim + channel0) * p.dstate;

    T const* const x_in = static_cast<T const*>(p.x);
    T const* const dt_in = static_cast<T const*>(p.dt);
    T const* const B_in = static_cast<T const*>(p.B);
    T const* const C_in = static_cast<T const*>(p.C);
    T const* const z_in = static_cast<T const*>(p.z);
    T* const out = static_cast<T*>(p.out);
    float const A = p.A[head];
    float const dt_bias = p.dt_bias ? p.dt_bias[head] : 0.f;

    for (int i = tid; i < kHeadTile * dstate; i += kThreads)
    {
        int const c = i / dstate;
        int const n = i % dstate;
        state[c * row + n] = p.initial_state && c < tile_width ? p.initial_state[state_offset + i] : 0.f;
    }
    // The outputs this thread computes in every chunk: channel `channel` at steps out_step[j].
    int const channel = tid % kHeadTile;
    int out_step[kOutputsPerThread];
#pragma unroll
    for (int j = 0; j < kOutputsPerThread; ++j)
    {
        out_step[j] = tid / kHeadTile + j * kStepStride;
    }

    for (int64_t chunk_start = 0; chunk_start < p.length; chunk_start += kChunk)
    {
        int const steps = static_cast<int>(min(static_cast<int64_t>(kChunk), p.length - chunk_start));
        __syncthreads(); // the previous chunk's tiles and decays are consumed
        if (tid < kWarpSize)
        {
            float d = 0.f;
            if (lane < steps)
            {
                d = to_float(dt_in[((batch * p.length + chunk_start + lane) * p.heads + head)]) + dt_bias;
                d = p.dt_softplus ? softplus(d) : d;
                d = limit_dt ? fminf(fmaxf(d, p.dt_min), p.dt_max) : d;
            }
            float const a = d * A;
            delta[lane] = d;
            decay[lane] = a;
            from_start[lane] = expf(warp_inclusive_sum(a, lane));
            // a_{t+1} + … + a_31 as a sum from the end (lane l scans a_{31-l}), not as total - prefix.
            float const from_end = warp_inclusive_sum(__shfl_sync(0xffffffffu, a, kWarpSize - 1 - lane), lane);
            float const after = __shfl_sync(0xffffffffu, from_end, max(kWarpSize - 2 - lane, 0));
            to_end[lane] = expf(lane == kWarpSize - 1 ? 0.f : after) * d;
        }
        for (int i = tid; i < kChunk * dstate; i += kThreads)
        {
            int const t = i / dstate;
            int const n = i % dstate;
            bool const valid = t < steps;
            int64_t const offset = ((batch * p.length + chunk_start + t) * p.ngroups + group) * p.dstate + n;
            B_tile[t * row + n] = valid ? to_float(B_in[offset]) : 0.f;
            C_tile[t * row + n] = valid ? to_float(C_in[offset]) : 0.f;
        }
        for (int i = tid; i < kChunk * kHeadTile; i += kThreads)
        {
            int const t = i / kHeadTile;
            int const c = i % kHeadTile;
            bool const valid = t < steps && c < tile_width;
            x_tile[i] = valid ? to_float(x_in[((batch * p.length + chunk_start + t) * p.heads + head) * p.headdim
                                    + channel0 + c])
                              : 0.f;
        }
        __syncthreads();

        // Within-chunk weights, and each thread's outputs from the carried state.
        for (int i = tid; i < kChunk * kChunk; i += kThreads)
        {
            int const t = i / kChunk;
            int const s = i % kChunk;
            float weight = 0.f;
            if (s <= t)
            {
                float dot = 0.f;
                for (int n = 0; n < dstate; ++n)
                {
                    dot += C_tile[t * row + n] * B_tile[s * row + n];
                }
                float between = 0.f;
                for (int k = s + 1; k <= t; ++k)
                {
                    between += decay[k];
                }
                weight = dot * expf(between) * delta[s];
            }
            weights[t * (kChunk + 1) + s] = weight;
        }
        float y[kOutputsPerThread] = {};
        for (int n = 0; n < dstate; ++n)
        {
            float const h = state[channel * row + n];
#pragma unroll
            for (int j = 0; j < kOutputsPerThread; ++j)
            {
                y[j] += C_tile[out_step[j] * row + n] * h;
            }
        }
#pragma unroll
        for (int j = 0; j < kOutputsPerThread; ++j)
        {
            y[j] *= from_start[out_step[j]];
        }
        __syncthreads(); // weights complete; every read of the carried state done

        for (int s = 0; s < steps; ++s)
        {
            float const x_s = x_tile[s * kHeadTile + channel];
#pragma unroll
            for (int j = 0; j < kOutputsPerThread; ++j)
            {
                y[j] += weights[out_step[j] * (kChunk + 1) + s] * x_s; // zero for s > t
            }
        }
        float const chunk_decay = from_start[kChunk - 1];
        // Entries first + k * kThreads, k < kStateBatch; past the end (i > last) the tiles are read
        // at `last` and the result is dropped.
        int const last = kHeadTile * dstate - 1;
        for (int first = tid; first <= last; first += kStateBatch * kThreads)
        {
            float h[kStateBatch];
#pragma unroll
            for (int k = 0; k < kStateBatch; ++k)
            {
                int const i = first + k * kThreads;
                h[k] = i <= last ? chunk_decay * state[(i / dstate) * row + i % dstate] : 0.f;
            }
            for (int s = 0; s < steps; ++s)
            {
                float const weight = to_end[s];
#pragma unroll
                for (int k = 0; k < kStateBatch; ++k)
                {
                    int const i = min(first + k * kThreads, last);
                    h[k] += weight * x_tile[s * kHeadTile + i / dstate] * B_tile[s * row + i % dstate];
                }
            }
#pragma unroll
            for (int k = 0; k < kStateBatch; ++k)
            {
                int const i = first + k * kThreads;
                if (i <= last)
                {
                    state[(i / dstate) * row + i % dstate] = h[k];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kOutputsPerThread; ++j)
        {
            int const t = out_step[j];
            if (t < steps && channel < tile_width)
            {
                int64_t const c = channel0 + channel;
                int64_t const offset = ((batch * p.length + chunk_start + t) * p.heads + head) * p.headdim + c;
                float const D = p.D ? p.D[p.D_has_hdim ? head * p.headdim + c : head] : 0.f;
                float value = y[j] + D * x_tile[t * kHeadTile + channel];
                if (z_in)
                {
                    value *= silu(to_float(z_in[offset]));
                }
                out[offset] = from_float<T>(value);
            }
        }
    }

    if (p.final_state)
    {
        __syncthreads(); // the last carry update is complete
        for (int i = tid; i < tile_width * dstate; i += kThreads)
        {
            p.final_state[state_offset + i] = state[(i / dstate) * row + i % dstate];
        }
    }
}

bool valid_params(mq_ssd_params const& p)
{
    bool const required = p.x && p.dt && p.A && p.B && p.C && p.out;
    bool const sizes = p.batch >= 0 && p.length >= 0 && p.heads > 0 && p.headdim > 0 && p.ngroups > 0
        && p.heads % p.ngroups == 0 && p.dstate > 0 && p.dstate <= MQ_SCAN_MAX_DSTATE;
    bool const dtype = p.dtype == MQ_SCAN_FLOAT32 || p.dtype == MQ_SCAN_FLOAT16;
    return required && sizes && dtype && !(p.dt_min > p.dt_max);
}

template <typename T, int kHeadTile>
int launch(mq_ssd_params const& p, size_t shared_bytes, cudaStream_t stream)
{
    int64_t const head_tiles = (p.headdim + kHeadTile - 1) / kHeadTile;
    if (head_tiles * p.heads > INT_MAX / p.batch)
    {
        return MQ_SCAN_ERR_INVALID_ARGUMENT;
    }
    auto const kernel = ssd_scan_forward_kernel<T, kHeadTile>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes))
        != cudaSuccess)
    {
        return MQ_SCAN_ERR_CUDA;
    }
    // mamba-ssm clamps only when a limit is set: with (0, inf) a negative Δ passes unchanged.
    bool const limit_dt = !(p.dt_min == 0.f && std::isinf(p.dt_max) && p.dt_max > 0.f);
    dim3 const grid(static_cast<unsigned>(p.batch * p.heads * head_tiles));
    kernel<<<grid, kThreads, shared_bytes, stream>>>(p, head_tiles, limit_dt);
    return cudaGetLastError() == cudaSuccess ? MQ_SCAN_OK : MQ_SCAN_ERR_CUDA;
}

template <typename T>
int launch_widest_tile(mq_ssd_params const& p, cudaStream_t stream)
{
    int device = 0;
    int shared_limit = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    {
        return MQ_SCAN_ERR_CUDA;
    }
    int const dstate = static_cast<int>(p.dstate);
    size_t const wide = SsdSharedLayout(kWideHeadTile, dstate).total * sizeof(float);
    if (wide <= static_cast<size_t>(shared_limit))
    {
        return launch<T, kWideHeadTile>(p, wide, stream);
    }
    size_t const narrow = SsdSharedLayout(kNarrowHeadTile, dstate).total * sizeof(float);
    if (narrow <= static_cast<size_t>(shared_limit))
    {
        return launch<T, kNarrowHeadTile>(p, narrow, stream);
    }
    return MQ_SCAN_ERR_SHARED_MEMORY;
}

} // namespace

extern "C" int mq_ssd_scan_forward(mq_ssd_params const* params, cudaStream_t stream)
{
    if (!params || !valid_params(*params))
    {
        return MQ_SCAN_ERR_INVALID_ARGUMENT;
    }
    if (params->batch == 0)
    {
        return MQ_SCAN_OK;
    }
    return params->dtype == MQ_SCAN_FLOAT16 ? launch_widest_tile<__half>(*params, stream)
                                            : launch_widest_tile<float>(*params, stream);
}
