#include "selective_scan_plugin.h"

#include "mq_scan.h"

#include <atomic>
#include <cstring>
#include <new>
#include <string>

using namespace nvinfer1;

namespace mq_export
{
namespace
{

constexpr char const* kFieldNames[] = MQ_SCAN_FIELD_NAMES;
constexpr char const* kAllInputNames[] = MQ_SCAN_ALL_INPUT_NAMES;
constexpr int32_t kInputGatingField[] = MQ_SCAN_INPUT_GATING_FIELD;

constexpr bool sameName(char const* a, char const* b)
{
    return *a == *b && (*a == '\0' || sameName(a + 1, b + 1));
}

// The enums in the header must follow the order generated from mq_export/ops.py.
static_assert(sizeof(kFieldNames) / sizeof(kFieldNames[0]) == kNumFields, "field count differs from ops.py");
static_assert(sameName(kFieldNames[kDeltaSoftplus], "delta_softplus") && sameName(kFieldNames[kHasD], "has_D")
        && sameName(kFieldNames[kHasZ], "has_z") && sameName(kFieldNames[kHasDeltaBias], "has_delta_bias")
        && sameName(kFieldNames[kHasInitialState], "has_initial_state")
        && sameName(kFieldNames[kReturnLastState], "return_last_state"),
    "Field enum order differs from SelectiveScanSpec fields");
static_assert(sizeof(kAllInputNames) / sizeof(kAllInputNames[0]) == kNumInputRoles, "input count differs from ops.py");
static_assert(sameName(kAllInputNames[kU], "u") && sameName(kAllInputNames[kDelta], "delta")
        && sameName(kAllInputNames[kA], "A") && sameName(kAllInputNames[kB], "B") && sameName(kAllInputNames[kC], "C")
        && sameName(kAllInputNames[kD], "D") && sameName(kAllInputNames[kZ], "z")
        && sameName(kAllInputNames[kDeltaBias], "delta_bias")
        && sameName(kAllInputNames[kInitialState], "initial_state"),
    "InputRole order differs from SelectiveScanSpec.input_names()");

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& message)
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
    {
        logger->log(ILogger::Severity::kERROR, (std::string(MQ_SCAN_OP_TYPE) + " plugin: " + message).c_str());
    }
}

std::vector<PluginField> integerFields(int32_t const* values)
{
    std::vector<PluginField> fields;
    for (int32_t i = 0; i < kNumFields; ++i)
    {
        fields.emplace_back(kFieldNames[i], values ? values + i : nullptr, PluginFieldType::kINT32, 1);
    }
    return fields;
}

} // namespace

SelectiveScanPlugin::SelectiveScanPlugin(ScanFields const& fields)
    : mFields(fields)
    , mNbInputs(0)
{
    for (int32_t role = 0; role < kNumInputRoles; ++role)
    {
        int32_t const gate = kInputGatingField[role];
        mPosition[role] = (gate < 0 || mFields[gate] != 0) ? mNbInputs++ : -1;
    }
}

IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SelectiveScanPlugin::clone() noexcept
{
    return new (std::nothrow) SelectiveScanPlugin(mFields);
}

char const* SelectiveScanPlugin::getPluginName() const noexcept
{
    return MQ_SCAN_OP_TYPE;
}

char const* SelectiveScanPlugin::getPluginVersion() const noexcept
{
    return MQ_SCAN_PLUGIN_VERSION;
}

char const* SelectiveScanPlugin::getPluginNamespace() const noexcept
{
    return MQ_SCAN_PLUGIN_NAMESPACE;
}

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept
{
    return mFields[kReturnLastState] ? 2 : 1;
}

bool SelectiveScanPlugin::hasInput(InputRole role) const
{
    return mPosition[role] >= 0;
}

int32_t SelectiveScanPlugin::position(InputRole role) const
{
    return mPosition[role];
}

bool SelectiveScanPlugin::isActivation(int32_t pos) const
{
    if (pos >= mNbInputs)
    {
        return pos == mNbInputs; // y; final_state is float32 state
    }
    for (InputRole role : {kU, kDelta, kB, kC, kZ})
    {
        if (mPosition[role] == pos)
        {
            return true;
        }
    }
    return false;
}

bool SelectiveScanPlugin::validIo(int32_t nbInputs, int32_t nbOutputs) const
{
    return nbInputs == mNbInputs && nbOutputs == getNbOutputs();
}

int32_t SelectiveScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!validIo(nbInputs, nbOutputs))
    {
        logError("unexpected number of inputs or outputs for its has_* / return_last_state attributes");
        return -1;
    }
    outputTypes[0] = inputTypes[position(kU)];
    if (mFields[kReturnLastState])
    {
        outputTypes[1] = DataType::kFLOAT;
    }
    return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept
{
    DimsExprs const& u = inputs[position(kU)];
    DimsExprs const& A = inputs[position(kA)];
    if (!validIo(nbInputs, nbOutputs) || u.nbDims != 3 || A.nbDims != 2)
    {
        logError("expects u of rank 3 (batch, dim, length) and A of rank 2 (dim, dstate)");
        return -1;
    }
    outputs[0] = u;
    if (mFields[kReturnLastState])
    {
        outputs[1].nbDims = 3;
        outputs[1].d[0] = u.d[0];
        outputs[1].d[1] = u.d[1];
        outputs[1].d[2] = A.d[1];
    }
    return 0;
}

bool SelectiveScanPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (!validIo(nbInputs, nbOutputs) || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (!isActivation(pos))
    {
        return desc.type == DataType::kFLOAT;
    }
    // TensorRT asks position by position; later activations must match u (position 0).
    if (pos == position(kU))
    {
        return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    }
    return desc.type == inOut[position(kU)].desc.type;
}

int32_t SelectiveScanPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (!validIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    int64_t const maxStates = in[position(kA)].max.d[1];
    if (maxStates > MQ_SCAN_MAX_DSTATE)
    {
        logError("d_state " + std::to_string(maxStates) + " exceeds the kernel's limit of "
            + std::to_string(MQ_SCAN_MAX_DSTATE));
        return -1;
    }
    return 0;
}

int32_t SelectiveScanPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    return validIo(nbInputs, nbOutputs) && in[position(kA)].dims.d[1] <= MQ_SCAN_MAX_DSTATE ? 0 : -1;
}

int32_t SelectiveScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    auto optional = [&](InputRole role) { return hasInput(role) ? inputs[position(role)] : nullptr; };
    Dims const& shape = inputDesc[position(kU)].dims;
    mq_scan_params params{};
    params.u = inputs[position(kU)];
    params.delta = inputs[position(kDelta)];
    params.A = static_cast<float const*>(inputs[position(kA)]);
    params.B = inputs[position(kB)];
    params.C = inputs[position(kC)];
    params.D = static_cast<float const*>(optional(kD));
    params.z = optional(kZ);
    params.delta_bias = static_cast<float const*>(optional(kDeltaBias));
    params.initial_state = static_cast<float const*>(optional(kInitialState));
    params.out = outputs[0];
    params.final_state = mFields[kReturnLastState] ? static_cast<float*>(outputs[1]) : nullptr;
    params.batch = shape.d[0];
    params.dim = shape.d[1];
    params.length = shape.d[2];
    params.dstate = inputDesc[position(kA)].dims.d[1];
    params.dtype = inputDesc[position(kU)].type == DataType::kHALF ? MQ_SCAN_FLOAT16 : MQ_SCAN_FLOAT32;
    params.delta_softplus = mFields[kDeltaSoftplus];
    int const status = mq_selective_scan_forward(&params, stream);
    if (status != MQ_SCAN_OK)
    {
        logError(std::string("kernel failed: ") + mq_scan_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* SelectiveScanPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields = integerFields(mFields.data());
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

SelectiveScanPluginCreator::SelectiveScanPluginCreator()
    : mFieldNames(integerFields(nullptr))
{
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SelectiveScanPluginCreator::getPluginName() const noexcept
{
    return MQ_SCAN_OP_TYPE;
}

char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept
{
    return MQ_SCAN_PLUGIN_VERSION;
}

char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept
{
    return MQ_SCAN_PLUGIN_NAMESPACE;
}

PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

// Build and runtime phases get the same integer fields (the runtime ones from
// getFieldsToSerialize), so one parser serves both. Every field is required: a node missing
// one was not written by mq_export and guessing its semantics would be worse than failing.
IPluginV3* SelectiveScanPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    ScanFields fields{};
    std::array<bool, kNumFields> seen{};
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        for (int32_t f = 0; f < kNumFields; ++f)
        {
            if (field.name && std::strcmp(field.name, kFieldNames[f]) == 0)
            {
                int32_t const value = field.type == PluginFieldType::kINT32 && field.length == 1 && field.data
                    ? *static_cast<int32_t const*>(field.data)
                    : -1;
                if (value != 0 && value != 1)
                {
                    logError(std::string("field '") + kFieldNames[f] + "' must be one INT32 equal to 0 or 1");
                    return nullptr;
                }
                fields[f] = value;
                seen[f] = true;
            }
        }
    }
    for (int32_t f = 0; f < kNumFields; ++f)
    {
        if (!seen[f])
        {
            logError(std::string("node '") + (name ? name : "") + "' lacks attribute '" + kFieldNames[f] + "'");
            return nullptr;
        }
    }
    return new (std::nothrow) SelectiveScanPlugin(fields);
}

} // namespace mq_export

extern "C" MQ_SCAN_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static mq_export::SelectiveScanPluginCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

// TensorRT hands loaded plugin libraries its logger through this hook.
extern "C" MQ_SCAN_API void setLoggerFinder(ILoggerFinder* finder)
{
    mq_export::gLoggerFinder.store(finder);
}

// Version of the TensorRT headers this library was compiled against (major*10000+minor*100+patch),
// so a harness or loader can spot a library built for another release.
extern "C" MQ_SCAN_API int32_t mq_trt_plugins_tensorrt_version()
{
    return NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
}
