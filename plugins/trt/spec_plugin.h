// The mq_export TensorRT plugins: one IPluginV3 class for every op, described by an OpSchema. The
// schema's contract part comes from the header generated from mq_export/ops/spec.py (name,
// version, namespace, INT/FLOAT fields, gated inputs and outputs); its op part (shapes, size limits,
// kernel call) from the op's source file (selective_scan_plugin.cpp, ssd_scan_plugin.cpp). Field
// parsing and serialization, tensor positions, output types and format checks are shared. Builds
// against TensorRT 10.3 (no NvInferPluginBase.h) up to 11.x: NvInferRuntime.h declares the IPluginV3
// family in all of them.
#pragma once

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#if NV_TENSORRT_MAJOR < 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR < 3)
#error "mq_trt_plugins needs TensorRT 10.3 or newer headers (IPluginV3OneCore/OneBuild/OneRuntime)"
#endif

namespace mq_export
{

class SpecPlugin;

// N flags, true at the given indices (an op's activation inputs, from its generated input indices).
template <size_t N>
constexpr std::array<bool, N> flagsAt(std::initializer_list<int32_t> indices)
{
    std::array<bool, N> flags{};
    for (int32_t index : indices)
    {
        flags[index] = true;
    }
    return flags;
}

// One op: its contract, from the generated <PREFIX>_* macros, which tensors carry activations,
// and what only the op knows.
struct OpSchema
{
    char const* name;
    char const* version;
    char const* pluginNamespace;
    int32_t nbFields;
    char const* const* fieldNames;
    int32_t const* fieldIsFloat;
    int32_t nbInputRoles;
    int32_t const* inputGatingField;
    // Per input role: true when it has the activation type (float32 or float16, one type for all
    // of them and the first output); false: float32 (parameters and state, full precision).
    bool const* inputIsActivation;
    int32_t nbOutputRoles;
    int32_t const* outputGatingField;

    // Output dimensions from the inputs'; false (after logging why) when the inputs do not fit.
    bool (*outputShapes)(SpecPlugin const& plugin, nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs* outputs);
    // Whether the kernel supports these sizes: at build time dims hold -1 for runtime dimensions
    // and maxima the profile's largest; at runtime both are the actual dims.
    bool (*supportsSizes)(SpecPlugin const& plugin, nvinfer1::Dims const* dims, nvinfer1::Dims const* maxima);
    // Enqueues the kernel; returns an mq_scan_status.
    int (*enqueue)(SpecPlugin const& plugin, nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs,
        void* const* outputs, cudaStream_t stream);
};

// A node's field values, indexed like OpSchema::fieldNames: INT fields in ints, FLOAT fields in floats.
struct FieldValues
{
    std::vector<int32_t> ints;
    std::vector<float> floats;
};

// Types: the activations (first input, its kind of inputs, first output) share one type, float32
// or float16 (linear layout); parameters and states are always float32 (full precision, as in mamba-ssm).
class SpecPlugin : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    SpecPlugin(OpSchema const& schema, FieldValues fields);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    // For the op's functions.
    int32_t flag(int32_t field) const
    {
        return mFields.ints[field];
    }
    float value(int32_t field) const
    {
        return mFields.floats[field];
    }
    // Position in the node's inputs of an input role, -1 when the node lacks it.
    int32_t position(int32_t role) const
    {
        return mPosition[role];
    }
    void const* optionalInput(void const* const* inputs, int32_t role) const
    {
        return mPosition[role] >= 0 ? inputs[mPosition[role]] : nullptr;
    }
    void error(std::string const& message) const;
    // d_state within the kernels' limit (else logs why).
    bool supportsStateSize(int64_t dstate) const;

private:
    bool validIo(int32_t nbInputs, int32_t nbOutputs) const;
    bool isActivation(int32_t pos) const;

    OpSchema const& mSchema;
    FieldValues mFields;

    std::vector<int32_t> mPosition;
    int32_t mNbInputs;
    int32_t mNbOutputs;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection;
};

// Creator for one op: parses the node's fields (every one required, flags 0 or 1, floats not NaN).
class SpecPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit SpecPluginCreator(OpSchema const& schema);

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    OpSchema const& mSchema;
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection;
};

// The ops getCreators lists a creator for.
extern OpSchema const kSelectiveScanSchema;
extern OpSchema const kSSDScanSchema;

} // namespace mq_export
