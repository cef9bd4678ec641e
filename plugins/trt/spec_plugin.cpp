#include "spec_plugin.h"

#include "mq_scan.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <new>

using namespace nvinfer1;

namespace mq_export
{
namespace
{

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

// Logs through the logger TensorRT handed the library (setLoggerFinder), if any.
void logError(OpSchema const& schema, std::string const& message)
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
    {
        logger->log(ILogger::Severity::kERROR, (std::string(schema.name) + " plugin: " + message).c_str());
    }
}

// PluginFields of an op, one per field; `values` null for the creator's field names.
std::vector<PluginField> pluginFields(OpSchema const& schema, FieldValues const* values)
{
    std::vector<PluginField> fields;
    for (int32_t i = 0; i < schema.nbFields; ++i)
    {
        bool const isFloat = schema.fieldIsFloat[i] != 0;
        void const* data = !values ? nullptr
            : isFloat              ? static_cast<void const*>(&values->floats[i])
                                   : &values->ints[i];
        fields.emplace_back(
            schema.fieldNames[i], data, isFloat ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
    }
    return fields;
}

// Positions of the present tensors among the node's inputs (or outputs), -1 for absent roles.
std::vector<int32_t> presentPositions(int32_t nbRoles, int32_t const* gatingField, FieldValues const& fields)
{
    std::vector<int32_t> positions(nbRoles);
    int32_t next = 0;
    for (int32_t role = 0; role < nbRoles; ++role)
    {
        int32_t const gate = gatingField[role];
        positions[role] = (gate < 0 || fields.ints[gate] != 0) ? next++ : -1;
    }
    return positions;
}

int32_t presentCount(std::vector<int32_t> const& positions)
{
    int32_t count = 0;
    for (int32_t p : positions)
    {
        count += p >= 0;
    }
    return count;
}

} // namespace

SpecPlugin::SpecPlugin(OpSchema const& schema, FieldValues fields)
    : mSchema(schema)
    , mFields(std::move(fields))
    , mPosition(presentPositions(schema.nbInputRoles, schema.inputGatingField, mFields))
    , mNbInputs(presentCount(mPosition))
    , mNbOutputs(presentCount(presentPositions(schema.nbOutputRoles, schema.outputGatingField, mFields)))
{
}

IPluginCapability* SpecPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SpecPlugin::clone() noexcept
{
    return new (std::nothrow) SpecPlugin(mSchema, mFields);
}

char const* SpecPlugin::getPluginName() const noexcept
{
    return mSchema.name;
}

char const* SpecPlugin::getPluginVersion() const noexcept
{
    return mSchema.version;
}

char const* SpecPlugin::getPluginNamespace() const noexcept
{
    return mSchema.pluginNamespace;
}

int32_t SpecPlugin::getNbOutputs() const noexcept
{
    return mNbOutputs;
}

bool SpecPlugin::validIo(int32_t nbInputs, int32_t nbOutputs) const
{
    return nbInputs == mNbInputs && nbOutputs == mNbOutputs;
}

void SpecPlugin::error(std::string const& message) const
{
    logError(mSchema, message);
}

bool SpecPlugin::supportsStateSize(int64_t dstate) const
{
    if (dstate > MQ_SCAN_MAX_DSTATE)
    {
        error("d_state " + std::to_string(dstate) + " exceeds the kernel's limit of "
            + std::to_string(MQ_SCAN_MAX_DSTATE));
        return false;
    }
    return true;
}

bool SpecPlugin::isActivation(int32_t pos) const
{
    if (pos >= mNbInputs)
    {
        return pos == mNbInputs; // y; a final state is float32
    }
    for (int32_t role = 0; role < mSchema.nbInputRoles; ++role)
    {
        if (mPosition[role] == pos)
        {
            return mSchema.inputIsActivation[role];
        }
    }
    return false;
}

int32_t SpecPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!validIo(nbInputs, nbOutputs))
    {
        error("unexpected number of inputs or outputs for its has_* / return_* attributes");
        return -1;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outputTypes[i] = isActivation(nbInputs + i) ? inputTypes[0] : DataType::kFLOAT;
    }
    return 0;
}

int32_t SpecPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept
{
    return validIo(nbInputs, nbOutputs) && mSchema.outputShapes(*this, inputs, outputs) ? 0 : -1;
}

bool SpecPlugin::supportsFormatCombination(
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
    // TensorRT asks position by position; later activations must match the first input's type.
    if (pos == 0)
    {
        return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    }
    return desc.type == inOut[0].desc.type;
}

int32_t SpecPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (!validIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    std::vector<Dims> dims;
    std::vector<Dims> maxima;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims.push_back(in[i].desc.dims);
        maxima.push_back(in[i].max);
    }
    return mSchema.supportsSizes(*this, dims.data(), maxima.data()) ? 0 : -1;
}

int32_t SpecPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (!validIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    std::vector<Dims> dims;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims.push_back(in[i].dims);
    }
    return mSchema.supportsSizes(*this, dims.data(), dims.data()) ? 0 : -1;
}

int32_t SpecPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void*, cudaStream_t stream) noexcept
{
    int const status = mSchema.enqueue(*this, inputDesc, inputs, outputs, stream);
    if (status != MQ_SCAN_OK)
    {
        error(std::string("kernel failed: ") + mq_scan_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* SpecPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* SpecPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields = pluginFields(mSchema, &mFields);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

SpecPluginCreator::SpecPluginCreator(OpSchema const& schema)
    : mSchema(schema)
    , mFieldNames(pluginFields(schema, nullptr))
{
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SpecPluginCreator::getPluginName() const noexcept
{
    return mSchema.name;
}

char const* SpecPluginCreator::getPluginVersion() const noexcept
{
    return mSchema.version;
}

char const* SpecPluginCreator::getPluginNamespace() const noexcept
{
    return mSchema.pluginNamespace;
}

PluginFieldCollection const* SpecPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

// Build and runtime phases get the same fields (the runtime ones from getFieldsToSerialize), so
// one parser serves both. Every field is required: a node missing one was not written by
// mq_export and guessing its semantics would be worse than failing.
IPluginV3* SpecPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    FieldValues values{std::vector<int32_t>(mSchema.nbFields), std::vector<float>(mSchema.nbFields)};
    std::vector<bool> seen(mSchema.nbFields);
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        for (int32_t f = 0; f < mSchema.nbFields; ++f)
        {
            if (!field.name || std::strcmp(field.name, mSchema.fieldNames[f]) != 0)
            {
                continue;
            }
            bool const single = field.length == 1 && field.data;
            if (mSchema.fieldIsFloat[f])
            {
                if (!single || field.type != PluginFieldType::kFLOAT32
                    || std::isnan(*static_cast<float const*>(field.data)))
                {
                    logError(
                        mSchema, std::string("field '") + mSchema.fieldNames[f] + "' must be one FLOAT32, not NaN");
                    return nullptr;
                }
                values.floats[f] = *static_cast<float const*>(field.data);
            }
            else
            {
                int32_t const value = single && field.type == PluginFieldType::kINT32
                    ? *static_cast<int32_t const*>(field.data)
                    : -1;
                if (value != 0 && value != 1)
                {
                    logError(mSchema,
                        std::string("field '") + mSchema.fieldNames[f] + "' must be one INT32 equal to 0 or 1");
                    return nullptr;
                }
                values.ints[f] = value;
            }
            seen[f] = true;
        }
    }
    for (int32_t f = 0; f < mSchema.nbFields; ++f)
    {
        if (!seen[f])
        {
            logError(mSchema,
                std::string("node '") + (name ? name : "") + "' lacks attribute '" + mSchema.fieldNames[f] + "'");
            return nullptr;
        }
    }
    return new (std::nothrow) SpecPlugin(mSchema, std::move(values));
}

} // namespace mq_export

extern "C" MQ_SCAN_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static mq_export::SpecPluginCreator selectiveScan(mq_export::kSelectiveScanSchema);
    static mq_export::SpecPluginCreator ssdScan(mq_export::kSSDScanSchema);
    static IPluginCreatorInterface* const creators[] = {&selectiveScan, &ssdScan};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
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
