// The SelectiveScan op (Mamba-1) for SpecPlugin: shapes, size limits, and the CUDA kernel of
// kernels/selective_scan.cu.
#include "spec_plugin.h"

#include "mq_scan.h"
#include "mq_scan_spec.h"

using namespace nvinfer1;

namespace mq_export
{
namespace
{

constexpr char const* kFieldNames[] = MQ_SCAN_FIELD_NAMES;
constexpr int32_t kFieldIsFloat[] = MQ_SCAN_FIELD_IS_FLOAT;
constexpr int32_t kInputGatingField[] = MQ_SCAN_INPUT_GATING_FIELD;
constexpr int32_t kOutputGatingField[] = MQ_SCAN_OUTPUT_GATING_FIELD;

// Inputs with the activation type; the others are float32 parameters and state.
constexpr auto kInputIsActivation = flagsAt<MQ_SCAN_NUM_INPUTS_MAX>(
    {MQ_SCAN_INPUT_U, MQ_SCAN_INPUT_DELTA, MQ_SCAN_INPUT_B, MQ_SCAN_INPUT_C, MQ_SCAN_INPUT_Z});

bool outputShapes(SpecPlugin const& plugin, DimsExprs const* inputs, DimsExprs* outputs)
{
    DimsExprs const& u = inputs[plugin.position(MQ_SCAN_INPUT_U)];
    DimsExprs const& A = inputs[plugin.position(MQ_SCAN_INPUT_A)];
    if (u.nbDims != 3 || A.nbDims != 2)
    {
        plugin.error("expects u of rank 3 (batch, dim, length) and A of rank 2 (dim, dstate)");
        return false;
    }
    outputs[0] = u;
    if (plugin.flag(MQ_SCAN_FIELD_RETURN_LAST_STATE))
    {
        outputs[1].nbDims = 3;
        outputs[1].d[0] = u.d[0];
        outputs[1].d[1] = u.d[1];
        outputs[1].d[2] = A.d[1];
    }
    return true;
}

bool supportsSizes(SpecPlugin const& plugin, Dims const*, Dims const* maxima)
{
    return plugin.supportsStateSize(maxima[plugin.position(MQ_SCAN_INPUT_A)].d[1]);
}

int enqueue(SpecPlugin const& plugin, PluginTensorDesc const* inputDesc, void const* const* inputs,
    void* const* outputs, cudaStream_t stream)
{
    Dims const& shape = inputDesc[plugin.position(MQ_SCAN_INPUT_U)].dims;
    mq_scan_params params{};
    params.u = inputs[plugin.position(MQ_SCAN_INPUT_U)];
    params.delta = inputs[plugin.position(MQ_SCAN_INPUT_DELTA)];
    params.A = static_cast<float const*>(inputs[plugin.position(MQ_SCAN_INPUT_A)]);
    params.B = inputs[plugin.position(MQ_SCAN_INPUT_B)];
    params.C = inputs[plugin.position(MQ_SCAN_INPUT_C)];
    params.D = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SCAN_INPUT_D));
    params.z = plugin.optionalInput(inputs, MQ_SCAN_INPUT_Z);
    params.delta_bias = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SCAN_INPUT_DELTA_BIAS));
    params.initial_state = static_cast<float const*>(plugin.optionalInput(inputs, MQ_SCAN_INPUT_INITIAL_STATE));
    params.out = outputs[0];
    params.final_state = plugin.flag(MQ_SCAN_FIELD_RETURN_LAST_STATE) ? static_cast<float*>(outputs[1]) : nullptr;
    params.batch = shape.d[0];
    params.dim = shape.d[1];
    params.length = shape.d[2];
    params.dstate = inputDesc[plugin.position(MQ_SCAN_INPUT_A)].dims.d[1];
    bool const half = inputDesc[plugin.position(MQ_SCAN_INPUT_U)].type == DataType::kHALF;
    params.dtype = half ? MQ_SCAN_FLOAT16 : MQ_SCAN_FLOAT32;
    params.delta_softplus = plugin.flag(MQ_SCAN_FIELD_DELTA_SOFTPLUS);
    params.reverse = plugin.flag(MQ_SCAN_FIELD_REVERSE);
    return mq_selective_scan_forward(&params, stream);
}

} // namespace

OpSchema const kSelectiveScanSchema{MQ_SCAN_OP_TYPE, MQ_SCAN_PLUGIN_VERSION, MQ_SCAN_PLUGIN_NAMESPACE,
    MQ_SCAN_NUM_FIELDS, kFieldNames, kFieldIsFloat, MQ_SCAN_NUM_INPUTS_MAX, kInputGatingField,
    kInputIsActivation.data(), MQ_SCAN_NUM_OUTPUTS_MAX, kOutputGatingField, outputShapes, supportsSizes, enqueue};

} // namespace mq_export
