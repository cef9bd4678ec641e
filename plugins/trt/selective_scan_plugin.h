// TensorRT IPluginV3 for the mq_export SelectiveScan node; enqueue runs the CUDA kernel of
// kernels/selective_scan.cu. Builds against TensorRT 10.3 (no NvInferPluginBase.h) up to 11.x:
// NvInferRuntime.h declares the IPluginV3 family in all of them.
#pragma once

#include "mq_scan_spec.h"

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <array>
#include <cstdint>
#include <vector>

#if NV_TENSORRT_MAJOR < 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR < 3)
#error "mq_trt_plugins needs TensorRT 10.3 or newer headers (IPluginV3OneCore/OneBuild/OneRuntime)"
#endif

namespace mq_export
{

// Same order as MQ_SCAN_FIELD_NAMES and MQ_SCAN_ALL_INPUT_NAMES; checked at compile time.
enum Field : int32_t
{
    kDeltaSoftplus,
    kHasD,
    kHasZ,
    kHasDeltaBias,
    kHasInitialState,
    kReturnLastState,
    kNumFields
};

enum InputRole : int32_t
{
    kU,
    kDelta,
    kA,
    kB,
    kC,
    kD,
    kZ,
    kDeltaBias,
    kInitialState,
    kNumInputRoles
};

using ScanFields = std::array<int32_t, kNumFields>;

// Types: u, delta, B, C, z and y share one type, float32 or float16 (linear layout);
// A, D, delta_bias, initial_state and final_state are always float32 (parameters and state
// keep full precision, as in mamba-ssm).
class SelectiveScanPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SelectiveScanPlugin(ScanFields const& fields);

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

private:
    bool hasInput(InputRole role) const;
    // Position in inOut (inputs then outputs) of an input role, -1 when the node lacks it.
    int32_t position(InputRole role) const;
    bool isActivation(int32_t pos) const;
    bool validIo(int32_t nbInputs, int32_t nbOutputs) const;

    ScanFields mFields;
    std::array<int32_t, kNumInputRoles> mPosition;
    int32_t mNbInputs;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection;
};

class SelectiveScanPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    SelectiveScanPluginCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection;
};

} // namespace mq_export
