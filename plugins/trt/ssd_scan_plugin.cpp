// The SSDScan op (Mamba-2's scan) for SpecPlugin: shapes, size limits, and the chunked CUDA kernel
// of kernels/ssd_scan.cu. A decode step is the same node at length 1 with the initial state in
// and the final state out.
#include "spec_plugin.h"

#include "mq_scan.h"
#include "mq_scan_spec.h"

using namespace nvinfer1;

namespace mq_export
{
namespace
{

constexpr char const* kFieldNames[] = MQ_SSD_FIELD_NAMES;
constexpr int32_t kFieldIsFloat[] = MQ_SSD_FIELD_IS_FLOAT;
constexpr int32_t kInputGatingField[] = MQ_SSD_INPUT_GATING_FIELD;
constexpr int32_t kOutputGatingField[] = MQ_SSD_OUTPUT_GATING_FIELD;

// Inputs with the activation type; the others are float32 parameters and state.
constexpr auto kInputIsActivation = flagsAt<MQ_SSD_NUM_INPUTS_MAX>(
    {MQ_SSD_INPUT_X, MQ_SSD_INPUT_DT, MQ_SSD_INPUT_B, MQ_SSD_INPUT_C, MQ_SSD_INPUT_Z});

bool outputShapes(SpecPlugin const& plugin, DimsExprs const* inputs, DimsExprs* outputs)
{
    DimsExprs const& x = inputs[plugin.position(MQ_SSD_INPUT_X)];
    DimsExprs const& B = inputs[plugin.position(MQ_SSD_INPUT_B)];
    if (x.nbDims != 4 || B.nbDims != 4)
    {
        plugin.error(
            "expects x of rank 4 (batch, length, heads, headdim) and B of rank 4 (batch, length, groups, dstate)");
        return false;
    }
    outputs[0] = x;
    if (plugin.flag(MQ_SSD_FIELD_RETURN_FINAL_STATE))
    {
        outputs[1].nbDims = 4;
        outputs[1].d[0] = x.d[0];
        outputs[1].d[1] = x.d[2];
        outputs[1].d[2] = x.d[3];
        outputs[1].d[3] = B.d[3];
    }
    return true;
}

// heads (from x) and groups (from B) are checked where known (> 0), d_state against its maximum.
bool supportsSizes(SpecPlugin const& plugin, Dims const* dims, Dims const* maxima)
{
    int64_t const heads = dims[plugin.position(MQ_SSD_INPUT_X)].d[2];
    int64_t const groups = dims[plugin.position(MQ_SSD_INPUT_B)].d[2];
    int64_t const dstate = maxima[plugin.position(MQ_SSD_INPUT_B)].d[3];
    if (!plugin.supportsStateSize(dstate))
    {
        return false;
    }
    if (heads > 0 && groups > 0 && heads % groups != 0)
    {
        plugin.error(std::to_string(groups) + " groups of B/C do not divide " + std::to_string(heads) + " heads");
        return false;
    }
    return true;
}

int enqueue(SpecPlugin const& plugin, PluginTensorDesc const* inputDesc, void const* const* inputs,
    void* const* outputs, cudaStream_t stream)
{
    Dims const& x = inputDesc[plugin.position(MQ_SSD_INPUT_X)].dims;
    Dims const& B = inputDesc[plugin.position(MQ_SSD_INPUT_B)].dims;
    mq_ssd_params params{};
    params.x = inputs[plugin.position(MQ_SSD_INPUT_X)];
    params.dt = inputs[plugin.position(MQ_SSD_INPUT_DT)];
    params.A = static_cast<float const*>(inputs[plugin.position(MQ_SSD_INPUT_A)]);
    params.B = inputs[plugin.position(MQ_SSD_INPUT_B)];
    params.C = inputs[plugin.position(MQ_SSD_INPUT_C)];
    params.D = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SSD_INPUT_D));
    params.z = plugin.optionalInput(inputs, MQ_SSD_INPUT_Z);
    params.dt_bias = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SSD_INPUT_DT_BIAS));
    params.initial_state = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SSD_INPUT_INITIAL_STATE));
    params.out = outputs[0];
    params.final_state = plugin.flag(MQ_SSD_FIELD_RETURN_FINAL_STATE) ? static_cast<float*>(outputs[1]) : nullptr;
    params.batch = x.d[0];
    params.length = x.d[1];
    params.heads = x.d[2];
    params.headdim = x.d[3];
    params.ngroups = B.d[2];
    params.dstate = B.d[3];
    params.dt_min = plugin.value(MQ_SSD_FIELD_DT_MIN);
    params.dt_max = plugin.value(MQ_SSD_FIELD_DT_MAX);
    bool const half = inputDesc[plugin.position(MQ_SSD_INPUT_X)].type == DataType::kHALF;
    params.dtype = half ? MQ_SCAN_FLOAT16 : MQ_SCAN_FLOAT32;
    params.dt_softplus = plugin.flag(MQ_SSD_FIELD_DT_SOFTPLUS);
    params.D_has_hdim = plugin.flag(MQ_SSD_FIELD_D_HAS_HDIM);
    return mq_ssd_scan_forward(&params, stream);
}

} // namespace

OpSchema const kSSDScanSchema{MQ_SSD_OP_TYPE, MQ_SSD_PLUGIN_VERSION, MQ_SSD_PLUGIN_NAMESPACE,
    MQ_SSD_NUM_FIELDS, kFieldNames, kFieldIsFloat, MQ_SSD_NUM_INPUTS_MAX, kInputGatingField, kInputIsActivation.data(),
    MQ_SSD_NUM_OUTPUTS_MAX, kOutputGatingField, outputShapes, supportsSizes, enqueue};

} // namespace mq_export
