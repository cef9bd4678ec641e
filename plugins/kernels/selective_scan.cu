// Chunked, parallel-in-time selective-scan forward kernel.
//
// Work split: one block covers kChannelsPerBlock channels of one batch element, one warp per
// channel. The sequence is walked in chunks of kChunk = 32 lanes x kItemsPerLane steps; each
// lane owns kItemsPerLane consecutive steps of the chunk. For every state index n the
// recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A_n), b_t = delta_t B_t u_t) is a scan
// over affine maps (a, b), composed as (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2):
//   level 1: each lane composes its own steps in registers,
//   level 2: a warp shuffle scan over the 32 lane summaries,
// and the state carried between chunks lives in shared memory (one float per channel and n).
// Global traffic is one coalesced read of u, delta, z and one write of out per element, plus
// B and C tiles that are staged in shared memory once per block and reused by all its channels.
// With `reverse` the same walk runs over time mirrored (logical step t reads and writes physical
// step length-1-t): the loads stay coalesced, only their direction changes.
#include "device_math.cuh"
#include "mq_scan.h"

#include <climits>

namespace
{

using namespace mq_export_kernels;

constexpr int kWarpSize = 32;
constexpr int kChannelsPerBlock = 8;
constexpr int kItemsPerLane = 8;
constexpr int kChunk = kWarpSize * kItemsPerLane;
// One padding word per 32 keeps both the coalesced (t = lane + 32k) and the lane-owned
// (t = lane * kItemsPerLane + k) access patterns free of shared-memory bank conflicts.
constexpr int kChunkPadded = kChunk + kChunk / kWarpSize;
constexpr int kStateTile = 8;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ int padded(int t)
{
    return t + t / kWarpSize;
}

// Physical time index of logical step t.
__device__ __forceinline__ int64_t physical_step(mq_scan_params const& p, int64_t t)
{
    return p.reverse ? p.length - 1 - t : t;
}

struct SharedStorage
{
    float stage[kChannelsPerBlock][kChunkPadded]; // per-warp transpose buffer
    float B[kStateTile][kChunkPadded];
    float C[kStateTile][kChunkPadded];
    float carry[kChannelsPerBlock][MQ_SCAN_MAX_DSTATE]; // state between chunks
};

// Reads `steps` elements of one channel's row (logical step t at row[direction * t]) with
// coalesced loads and hands each lane its kItemsPerLane consecutive steps (zeros past the end).
template <typename T>
__device__ void load_lane_items(
    T const* row, int direction, int steps, float* stage, int lane, float (&items)[kItemsPerLane])
{
#pragma unroll
    for (int k = 0; k < kItemsPerLane; ++k)
    {
        int const t = lane + kWarpSize * k;
        stage[padded(t)] = t < steps ? to_float(row[direction * t]) : 0.f;
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kItemsPerLane; ++k)
    {
        items[k] = stage[padded(lane * kItemsPerLane + k)];
    }
    __syncwarp();
}

// Inverse of load_lane_items: lane-owned values out through coalesced stores.
template <typename T>
__device__ void store_lane_items(
    T* row, int direction, int steps, float* stage, int lane, float const (&items)[kItemsPerLane])
{
#pragma unroll
    for (int k = 0; k < kItemsPerLane; ++k)
    {
        stage[padded(lane * kItemsPerLane + k)] = items[k];
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kItemsPerLane; ++k)
    {
        int const t = lane + kWarpSize * k;
        if (t < steps)
        {
            row[direction * t] = from_float<T>(stage[padded(t)]);
        }
    }
    __syncwarp();
}

// Inclusive warp scan of affine maps h -> decay * h + state, lane 0 first.
__device__ __forceinline__ void warp_scan_affine(float& decay, float& state, int lane)
{
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2)
    {
        float const prev_decay = __shfl_up_sync(0xffffffffu, decay, offset);
        float const prev_state = __shfl_up_sync(0xffffffffu, state, offset);
        if (lane >= offset)
        {
            state = decay * prev_state + state;
            decay = decay * prev_decay;
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kChannelsPerBlock * kWarpSize)
    selective_scan_forward_kernel(mq_scan_params p, int64_t channel_groups)
{
    __shared__ SharedStorage smem;

    int const lane = threadIdx.x % kWarpSize;
    int const warp = threadIdx.x / kWarpSize;
    int64_t const batch = blockIdx.x / channel_groups;
    int64_t const channel = (blockIdx.x % channel_groups) * kChannelsPerBlock + warp;
    // Warps past the last channel still take part in the block-wide tile loads and barriers.
    bool const active = channel < p.dim;
    int const dstate = static_cast<int>(p.dstate);

    int64_t const row_offset = (batch * p.dim + channel) * p.length; // into u, delta, z, out
    int64_t const state_offset = (batch * p.dim + channel) * p.dstate;
    float* const stage = smem.stage[warp];
    float* const carry = smem.carry[warp];

    if (active)
    {
        for (int n = lane; n < dstate; n += kWarpSize)
        {
            carry[n] = p.initial_state ? p.initial_state[state_offset + n] : 0.f;
        }
    }
    float const D = (active && p.D) ? p.D[channel] : 0.f;
    float const delta_bias = (active && p.delta_bias) ? p.delta_bias[channel] : 0.f;

    T const* const u_in = static_cast<T const*>(p.u);
    T const* const delta_in = static_cast<T const*>(p.delta);
    T const* const B_in = static_cast<T const*>(p.B);
    T const* const C_in = static_cast<T const*>(p.C);
    T const* const z_in = static_cast<T const*>(p.z);
    T* const out = static_cast<T*>(p.out);
    int const direction = p.reverse ? -1 : 1;

    for (int64_t chunk_start = 0; chunk_start < p.length; chunk_start += kChunk)
    {
        int const steps = static_cast<int>(min(static_cast<int64_t>(kChunk), p.length - chunk_start));
        int64_t const chunk_row = row_offset + physical_step(p, chunk_start);
        float u[kItemsPerLane];
        float delta[kItemsPerLane];
        float y[kItemsPerLane];
        if (active)
        {
            load_lane_items(u_in + chunk_row, direction, steps, stage, lane, u);
            load_lane_items(delta_in + chunk_row, direction, steps, stage, lane, delta);
#pragma unroll
            for (int k = 0; k < kItemsPerLane; ++k)
            {
                float const d = delta[k] + delta_bias;
                // delta = 0 past the end makes those steps the identity map (decay 1, input 0),
                // so the carried state after the last chunk is the final state.
                delta[k] = lane * kItemsPerLane + k < steps ? (p.delta_softplus ? softplus(d) : d) : 0.f;
                y[k] = 0.f;
            }
        }

        for (int n0 = 0; n0 < dstate; n0 += kStateTile)
        {
            __syncthreads(); // previous B/C tile fully consumed
            for (int i = threadIdx.x; i < kStateTile * kChunk; i += blockDim.x)
            {
                int const tile_n = i / kChunk;
                int const t = i % kChunk;
                bool const valid = n0 + tile_n < dstate && t < steps;
                int64_t const offset = (batch * p.dstate + n0 + tile_n) * p.length + physical_step(p, chunk_start + t);
                smem.B[tile_n][padded(t)] = valid ? to_float(B_in[offset]) : 0.f;
                smem.C[tile_n][padded(t)] = valid ? to_float(C_in[offset]) : 0.f;
            }
            __syncthreads();
            if (!active)
            {
                continue;
            }
            int const tile_states = min(kStateTile, dstate - n0);
            for (int tile_n = 0; tile_n < tile_states; ++tile_n)
            {
                int const n = n0 + tile_n;
                float const A_log2 = p.A[channel * p.dstate + n] * kLog2e;
                float decay[kItemsPerLane];
                float input[kItemsPerLane];
                float lane_decay = 1.f;
                float lane_state = 0.f;
#pragma unroll
                for (int k = 0; k < kItemsPerLane; ++k)
                {
                    int const idx = padded(lane * kItemsPerLane + k);
                    decay[k] = exp2f(delta[k] * A_log2);
                    input[k] = delta[k] * u[k] * smem.B[tile_n][idx];
                    lane_state = decay[k] * lane_state + input[k];
                    lane_decay *= decay[k];
                }
                warp_scan_affine(lane_decay, lane_state, lane);
                // Exclusive prefix (steps before this lane's) applied to the chunk's start state.
                float const prefix_decay = __shfl_up_sync(0xffffffffu, lane_decay, 1);
                float const prefix_state = __shfl_up_sync(0xffffffffu, lane_state, 1);
                float const chunk_start_state = carry[n];
                float h = lane == 0 ? chunk_start_state : prefix_decay * chunk_start_state + prefix_state;
#pragma unroll
                for (int k = 0; k < kItemsPerLane; ++k)
                {
                    h = decay[k] * h + input[k];
                    y[k] += h * smem.C[tile_n][padded(lane * kItemsPerLane + k)];
                }
                float const chunk_decay = __shfl_sync(0xffffffffu, lane_decay, kWarpSize - 1);
                float const chunk_state = __shfl_sync(0xffffffffu, lane_state, kWarpSize - 1);
                __syncwarp(); // every lane has read carry[n] before lane 0 overwrites it
                if (lane == 0)
                {
                    carry[n] = chunk_decay * chunk_start_state + chunk_state;
                }
            }
        }

        if (active)
        {
            if (z_in)
            {
                float z[kItemsPerLane];
                load_lane_items(z_in + chunk_row, direction, steps, stage, lane, z);
#pragma unroll
                for (int k = 0; k < kItemsPerLane; ++k)
                {
                    y[k] = (y[k] + D * u[k]) * silu(z[k]);
                }
            }
            else
            {
#pragma unroll
                for (int k = 0; k < kItemsPerLane; ++k)
                {
                    y[k] += D * u[k];
                }
            }
            store_lane_items(out + chunk_row, direction, steps, stage, lane, y);
        }
    }

    if (active && p.final_state)
    {
        __syncwarp(); // lane 0's last carry writes visible to the whole warp
        for (int n = lane; n < dstate; n += kWarpSize)
        {
            p.final_state[state_offset + n] = carry[n];
        }
    }
}

bool valid_params(mq_scan_params const& p)
{
    bool const required = p.u && p.delta && p.A && p.B && p.C && p.out;
    bool const sizes = p.batch >= 0 && p.dim > 0 && p.length >= 0 && p.dstate > 0 && p.dstate <= MQ_SCAN_MAX_DSTATE;
    bool const dtype = p.dtype == MQ_SCAN_FLOAT32 || p.dtype == MQ_SCAN_FLOAT16;
    return required && sizes && dtype;
}

} // namespace

extern "C" int mq_scan_abi_version(void)
{
    return MQ_SCAN_ABI_VERSION;
}

extern "C" int mq_selective_scan_forward(mq_scan_params const* params, cudaStream_t stream)
{
    if (!params || !valid_params(*params))
    {
        return MQ_SCAN_ERR_INVALID_ARGUMENT;
    }
    mq_scan_params const& p = *params;
    if (p.batch == 0)
    {
        return MQ_SCAN_OK;
    }
    int64_t const channel_groups = (p.dim + kChannelsPerBlock - 1) / kChannelsPerBlock;
    if (channel_groups > INT_MAX / p.batch)
    {
        return MQ_SCAN_ERR_INVALID_ARGUMENT;
    }
    dim3 const grid(static_cast<unsigned>(channel_groups * p.batch));
    dim3 const block(kChannelsPerBlock * kWarpSize);
    if (p.dtype == MQ_SCAN_FLOAT16)
    {
        selective_scan_forward_kernel<__half><<<grid, block, 0, stream>>>(p, channel_groups);
    }
    else
    {
        selective_scan_forward_kernel<float><<<grid, block, 0, stream>>>(p, channel_groups);
    }
    return cudaGetLastError() == cudaSuccess ? MQ_SCAN_OK : MQ_SCAN_ERR_CUDA;
}

extern "C" char const* mq_scan_status_string(int status)
{
    switch (status)
    {
    case MQ_SCAN_OK: return "success";
    case MQ_SCAN_ERR_INVALID_ARGUMENT: return "invalid argument (null required pointer, bad size or dtype)";
    case MQ_SCAN_ERR_CUDA: return "CUDA launch error";
    case MQ_SCAN_ERR_SHARED_MEMORY: return "the device's shared memory per block is too small for this d_state";
    default: return "unknown status";
    }
}
