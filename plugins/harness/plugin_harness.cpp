// Exercises libmq_trt_plugins.so the way TensorRT's ONNX parser and runtime would, without any
// TensorRT library: everything called here is virtual or inline in the TensorRT headers.
//
//   mq_plugin_harness PLUGIN_SO NODE_FILE [REFERENCE_DIR]
//
// NODE_FILE describes one exported node (written by mq_export.ops.plugin_spec), one entry per line:
//   op_type SelectiveScan|SSDScan | int NAME VALUE | float NAME VALUE | string NAME VALUE
//   | inputs NAME... | outputs NAME...
// REFERENCE_DIR (optional, used only when a CUDA device exists) holds shape.txt with one
// "SIZE VALUE" line per size the op's tensors use (batch, length, dim, dstate; heads, headdim,
// groups) and float32 little-endian NAME.bin files for every input and output.
#include "mq_scan.h"
#include "mq_scan_spec.h"

#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

struct NodeDescription
{
    std::string opType;
    std::vector<std::pair<std::string, int32_t>> ints;
    std::vector<std::pair<std::string, float>> floats;
    std::vector<std::pair<std::string, std::string>> strings;
    std::vector<std::string> inputs;
    std::vector<std::string> outputs;

    int32_t intAttribute(std::string const& name) const
    {
        for (auto const& [key, value] : ints)
        {
            if (key == name)
            {
                return value;
            }
        }
        throw std::runtime_error("node description lacks int attribute " + name);
    }

    // Defaults are the ONNX parser's for a missing attribute.
    std::string stringAttribute(std::string const& name, std::string const& fallback) const
    {
        for (auto const& [key, value] : strings)
        {
            if (key == name)
            {
                return value;
            }
        }
        return fallback;
    }
};

NodeDescription readNode(std::string const& path)
{
    std::ifstream file(path);
    if (!file)
    {
        throw std::runtime_error("cannot read " + path);
    }
    NodeDescription node;
    std::string line;
    while (std::getline(file, line))
    {
        std::istringstream words(line);
        std::string kind;
        words >> kind;
        if (kind == "op_type")
        {
            words >> node.opType;
        }
        else if (kind == "int" || kind == "float" || kind == "string")
        {
            std::string name;
            std::string value;
            words >> name >> value;
            if (kind == "int")
            {
                node.ints.emplace_back(name, std::stoi(value));
            }
            else if (kind == "float")
            {
                node.floats.emplace_back(name, std::stof(value)); // reads "inf"
            }
            else
            {
                node.strings.emplace_back(name, value);
            }
        }
        else if (kind == "inputs" || kind == "outputs")
        {
            auto& names = kind == "inputs" ? node.inputs : node.outputs;
            for (std::string name; words >> name;)
            {
                names.push_back(name);
            }
        }
        else if (!kind.empty() && kind[0] != '#')
        {
            throw std::runtime_error("unknown line in " + path + ": " + line);
        }
    }
    return node;
}

int gFailures = 0;
int gPassed = 0;

void check(bool condition, std::string const& what)
{
    std::cout << (condition ? "[ok]   " : "[FAIL] ") << what << "\n";
    (condition ? gPassed : gFailures)++;
}

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cout << "       plugin log: " << msg << "\n";
        }
    }
};

class LoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &mLogger;
    }

private:
    CapturingLogger mLogger;
};

// IDimensionExpr/IExprBuilder forward to implementation objects TensorRT normally supplies; these
// stand-ins carry a constant value (or -1: a runtime dimension) so output shapes can be checked.
class FakeDimensionImpl : public apiv::VDimensionExpr
{
public:
    explicit FakeDimensionImpl(int64_t value)
        : mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mValue >= 0;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class FakeDimension : public IDimensionExpr
{
public:
    explicit FakeDimension(int64_t value)
        : mFake(value)
    {
        mImpl = &mFake;
    }

private:
    FakeDimensionImpl mFake;
};

class NullExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t) override
    {
        return nullptr;
    }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
};

class NullExprBuilder : public IExprBuilder
{
public:
    NullExprBuilder()
    {
        mImpl = &mFake;
    }

private:
    NullExprBuilderImpl mFake;
};

bool isStateOrParameter(std::string const& role)
{
    static std::set<std::string> const kFloat32Roles{
        "A", "D", "delta_bias", "dt_bias", "initial_state", "final_state"};
    return kFloat32Roles.count(role) > 0;
}

using Shape = std::vector<std::string>;            // size names, outermost first
using Sizes = std::map<std::string, int64_t>; // value by size name

// Each tensor role's shape, written from the ops' documented layouts (mamba-ssm's), independently
// of the plugin's own shape code.
std::map<std::string, Shape> roleShapes(NodeDescription const& node)
{
    if (node.opType == MQ_SCAN_OP_TYPE)
    {
        Shape const sequence{"batch", "dim", "length"};
        Shape const state{"batch", "dim", "dstate"};
        return {{"u", sequence}, {"delta", sequence}, {"z", sequence}, {"y", sequence}, {"A", {"dim", "dstate"}},
            {"B", {"batch", "dstate", "length"}}, {"C", {"batch", "dstate", "length"}}, {"D", {"dim"}},
            {"delta_bias", {"dim"}}, {"initial_state", state}, {"final_state", state}};
    }
    if (node.opType == MQ_SSD_OP_TYPE)
    {
        Shape const sequence{"batch", "length", "heads", "headdim"};
        Shape const state{"batch", "heads", "headdim", "dstate"};
        Shape const D = node.intAttribute("D_has_hdim") ? Shape{"heads", "headdim"} : Shape{"heads"};
        return {{"x", sequence}, {"z", sequence}, {"y", sequence}, {"dt", {"batch", "length", "heads"}},
            {"A", {"heads"}}, {"dt_bias", {"heads"}}, {"D", D}, {"B", {"batch", "length", "groups", "dstate"}},
            {"C", {"batch", "length", "groups", "dstate"}}, {"initial_state", state}, {"final_state", state}};
    }
    throw std::runtime_error("no tensor layouts for op " + node.opType);
}

Dims dimsOf(Shape const& shape, Sizes const& sizes)
{
    Dims dims{};
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
    {
        dims.d[i] = sizes.at(shape[i]);
    }
    return dims;
}

// Every INT32 and FLOAT32 field by name.
std::map<std::string, double> fieldValues(PluginFieldCollection const* fc)
{
    std::map<std::string, double> values;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.type == PluginFieldType::kINT32 && field.length == 1)
        {
            values[field.name] = *static_cast<int32_t const*>(field.data);
        }
        else if (field.type == PluginFieldType::kFLOAT32 && field.length == 1)
        {
            values[field.name] = *static_cast<float const*>(field.data);
        }
    }
    return values;
}

std::map<std::string, double> serializedFields(IPluginV3* plugin)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    return fieldValues(runtime->getFieldsToSerialize());
}

size_t volume(Dims const& dims)
{
    size_t count = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        count *= static_cast<size_t>(dims.d[i]);
    }
    return count;
}

std::vector<float> readFloats(std::string const& path, size_t count)
{
    std::vector<float> values(count);
    std::ifstream file(path, std::ios::binary);
    file.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!file)
    {
        throw std::runtime_error("cannot read " + std::to_string(count) + " floats from " + path);
    }
    return values;
}

// Runs enqueue on device copies of the reference inputs and compares with the reference outputs.
void compareWithReference(IPluginV3OneRuntime* runtime, NodeDescription const& node, std::string const& dir)
{
    std::ifstream shapeFile(dir + "/shape.txt");
    Sizes sizes;
    std::string name;
    for (int64_t value = 0; shapeFile >> name >> value;)
    {
        sizes[name] = value;
    }
    std::map<std::string, Shape> const shapes = roleShapes(node);

    std::vector<void*> buffers;
    auto tensors = [&](std::vector<std::string> const& roles, bool upload) {
        std::vector<PluginTensorDesc> descs;
        std::vector<void*> pointers;
        for (auto const& role : roles)
        {
            Dims const shape = dimsOf(shapes.at(role), sizes);
            size_t const bytes = volume(shape) * sizeof(float);
            void* device = nullptr;
            cudaMalloc(&device, bytes);
            buffers.push_back(device);
            if (upload)
            {
                std::vector<float> host = readFloats(dir + "/" + role + ".bin", volume(shape));
                cudaMemcpy(device, host.data(), bytes, cudaMemcpyHostToDevice);
            }
            descs.push_back(PluginTensorDesc{shape, DataType::kFLOAT, TensorFormat::kLINEAR, 1.f});
            pointers.push_back(device);
        }
        return std::make_pair(descs, pointers);
    };
    auto [inDescs, inPointers] = tensors(node.inputs, true);
    auto [outDescs, outPointers] = tensors(node.outputs, false);
    check(runtime->onShapeChange(inDescs.data(), static_cast<int32_t>(inDescs.size()), outDescs.data(),
              static_cast<int32_t>(outDescs.size())) == 0,
        "onShapeChange accepts the reference shapes");
    int32_t const status = runtime->enqueue(inDescs.data(), outDescs.data(), inPointers.data(), outPointers.data(), nullptr, nullptr);
    cudaError_t const sync = cudaDeviceSynchronize();
    check(status == 0 && sync == cudaSuccess, std::string("enqueue on the device: ") + cudaGetErrorString(sync));
    for (size_t i = 0; i < node.outputs.size(); ++i)
    {
        size_t const count = volume(outDescs[i].dims);
        std::vector<float> got(count);
        cudaMemcpy(got.data(), outPointers[i], count * sizeof(float), cudaMemcpyDeviceToHost);
        std::vector<float> const expected = readFloats(dir + "/" + node.outputs[i] + ".bin", count);
        double worst = 0.0;
        for (size_t j = 0; j < count; ++j)
        {
            worst = std::max(worst, std::abs(double(got[j]) - expected[j]) / (1e-3 + 1e-3 * std::abs(expected[j])));
        }
        check(worst <= 1.0, "output " + node.outputs[i] + " matches the reference (worst |err| / (1e-3 + 1e-3 |ref|) = "
                + std::to_string(worst) + ")");
    }
    for (void* buffer : buffers)
    {
        cudaFree(buffer);
    }
}

// getOutputShapes for one set of sizes (-1: a runtime dimension); the outputs must be the
// expressions of the sizes their layouts name.
bool outputShapesFollow(IPluginV3OneBuild* build, NodeDescription const& node, Sizes const& sizes)
{
    std::map<std::string, Shape> const shapes = roleShapes(node);
    std::map<std::string, std::unique_ptr<FakeDimension>> dimensions;
    for (auto const& [name, value] : sizes)
    {
        dimensions[name] = std::make_unique<FakeDimension>(value);
    }
    auto exprs = [&](Shape const& shape) {
        DimsExprs e{};
        e.nbDims = static_cast<int32_t>(shape.size());
        for (size_t i = 0; i < shape.size(); ++i)
        {
            e.d[i] = dimensions.at(shape[i]).get();
        }
        return e;
    };
    std::vector<DimsExprs> inputs;
    for (auto const& role : node.inputs)
    {
        inputs.push_back(exprs(shapes.at(role)));
    }
    int32_t const nbOutputs = static_cast<int32_t>(node.outputs.size());
    std::vector<DimsExprs> outputs(nbOutputs);
    NullExprBuilder builder;
    bool ok = build->getOutputShapes(inputs.data(), static_cast<int32_t>(inputs.size()), nullptr, 0, outputs.data(),
                  nbOutputs, builder)
        == 0;
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        DimsExprs const expected = exprs(shapes.at(node.outputs[i]));
        ok = ok && outputs[i].nbDims == expected.nbDims
            && std::equal(expected.d, expected.d + expected.nbDims, outputs[i].d);
    }
    return ok;
}

std::string describe(Sizes const& sizes, std::set<std::string> const& used)
{
    std::string text;
    for (auto const& [name, value] : sizes)
    {
        if (used.count(name))
        {
            std::string const size = value < 0 ? std::string("runtime") : std::to_string(value);
            text += (text.empty() ? "" : ", ") + name + " " + size;
        }
    }
    return text;
}

// onShapeChange with float32 tensors of these (concrete) sizes.
int32_t shapeChange(IPluginV3OneRuntime* runtime, NodeDescription const& node, Sizes const& sizes)
{
    std::map<std::string, Shape> const shapes = roleShapes(node);
    auto descs = [&](std::vector<std::string> const& roles) {
        std::vector<PluginTensorDesc> result;
        for (auto const& role : roles)
        {
            Dims const dims = dimsOf(shapes.at(role), sizes);
            result.push_back(PluginTensorDesc{dims, DataType::kFLOAT, TensorFormat::kLINEAR, 1.f});
        }
        return result;
    };
    std::vector<PluginTensorDesc> const in = descs(node.inputs);
    std::vector<PluginTensorDesc> const out = descs(node.outputs);
    return runtime->onShapeChange(
        in.data(), static_cast<int32_t>(in.size()), out.data(), static_cast<int32_t>(out.size()));
}

// configurePlugin with these build-time sizes (-1: runtime) and maxima.
int32_t configure(IPluginV3OneBuild* build, NodeDescription const& node, Sizes const& sizes,
    Sizes const& maxima)
{
    std::map<std::string, Shape> const shapes = roleShapes(node);
    std::vector<std::string> roles = node.inputs;
    roles.insert(roles.end(), node.outputs.begin(), node.outputs.end());
    std::vector<DynamicPluginTensorDesc> ranges(roles.size());
    for (size_t pos = 0; pos < roles.size(); ++pos)
    {
        ranges[pos].desc.dims = dimsOf(shapes.at(roles[pos]), sizes);
        ranges[pos].max = dimsOf(shapes.at(roles[pos]), maxima);
        ranges[pos].min = ranges[pos].max;
    }
    int32_t const nbInputs = static_cast<int32_t>(node.inputs.size());
    return build->configurePlugin(
        ranges.data(), nbInputs, ranges.data() + nbInputs, static_cast<int32_t>(node.outputs.size()));
}

int run(std::string const& pluginPath, std::string const& nodePath, std::string const& referenceDir)
{
    NodeDescription const node = readNode(nodePath);
    void* library = dlopen(pluginPath.c_str(), RTLD_NOW | RTLD_LOCAL);
    check(library != nullptr, "dlopen " + pluginPath + " with RTLD_NOW and no TensorRT library loaded"
            + (library ? "" : std::string(": ") + dlerror()));
    if (!library)
    {
        return 1;
    }
    auto getCreators = reinterpret_cast<IPluginCreatorInterface* const* (*) (int32_t&)>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<void (*)(ILoggerFinder*)>(dlsym(library, "setLoggerFinder"));
    auto builtAgainst = reinterpret_cast<int32_t (*)()>(dlsym(library, "mq_trt_plugins_tensorrt_version"));
    check(getCreators && setLoggerFinder && builtAgainst, "exports getCreators, setLoggerFinder, mq_trt_plugins_tensorrt_version");
    if (!getCreators || !setLoggerFinder || !builtAgainst)
    {
        return 1;
    }
    int32_t const harnessVersion = NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
    check(builtAgainst() == harnessVersion, "plugin built against TensorRT headers " + std::to_string(builtAgainst())
            + ", harness against " + std::to_string(harnessVersion));
    static LoggerFinder loggerFinder;
    setLoggerFinder(&loggerFinder);

    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    std::map<std::string, IPluginCreatorV3One*> byName;
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0)
        {
            auto* creatorV3 = static_cast<IPluginCreatorV3One*>(creators[i]);
            byName[creatorV3->getPluginName()] = creatorV3;
        }
    }
    check(nbCreators == 2 && byName.count(MQ_SCAN_OP_TYPE) && byName.count(MQ_SSD_OP_TYPE),
        std::string("getCreators lists exactly the IPluginCreatorV3One creators ") + MQ_SCAN_OP_TYPE + " and "
            + MQ_SSD_OP_TYPE);
    IPluginCreatorV3One* creator = byName.count(node.opType) ? byName.at(node.opType) : nullptr;
    check(creator != nullptr, "getCreators lists an IPluginCreatorV3One named " + node.opType);
    if (!creator)
    {
        return 1;
    }
    std::string const version = node.stringAttribute("plugin_version", "1");
    std::string const ns = node.stringAttribute("plugin_namespace", "");
    check(creator->getPluginVersion() == version && creator->getPluginNamespace() == ns,
        "creator version '" + std::string(creator->getPluginVersion()) + "' namespace '" + creator->getPluginNamespace()
            + "' equal the node's plugin_version '" + version + "' plugin_namespace '" + ns + "'");

    // Like the ONNX parser: only attributes named by getFieldNames reach createPlugin,
    // INT as kINT32, FLOAT as kFLOAT32 and STRING as kCHAR.
    std::map<std::string, PluginFieldType> fieldTypes;
    PluginFieldCollection const* names = creator->getFieldNames();
    for (int32_t i = 0; i < names->nbFields; ++i)
    {
        fieldTypes[names->fields[i].name] = names->fields[i].type;
    }
    std::vector<PluginField> fields;
    std::map<std::string, double> nodeFields;
    for (auto const& [name, value] : node.ints)
    {
        if (fieldTypes.count(name))
        {
            fields.emplace_back(name.c_str(), &value, PluginFieldType::kINT32, 1);
            nodeFields[name] = value;
        }
    }
    for (auto const& [name, value] : node.floats)
    {
        if (fieldTypes.count(name))
        {
            fields.emplace_back(name.c_str(), &value, PluginFieldType::kFLOAT32, 1);
            nodeFields[name] = value;
        }
    }
    for (auto const& [name, value] : node.strings)
    {
        if (fieldTypes.count(name))
        {
            fields.emplace_back(name.c_str(), value.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(value.size()));
        }
    }
    bool typesDeclared = true;
    for (auto const& [name, value] : node.floats)
    {
        typesDeclared = typesDeclared && (!fieldTypes.count(name) || fieldTypes.at(name) == PluginFieldType::kFLOAT32);
    }
    for (auto const& [name, value] : node.ints)
    {
        typesDeclared = typesDeclared && (!fieldTypes.count(name) || fieldTypes.at(name) == PluginFieldType::kINT32);
    }
    check(typesDeclared, "getFieldNames declares INT attributes as kINT32 and FLOAT attributes as kFLOAT32");
    PluginFieldCollection const fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("harness_node", &fc, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "createPlugin (build phase) from " + std::to_string(fields.size()) + " node attributes");
    if (!plugin)
    {
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime && std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability interfaces core/build/runtime");
    check(core->getPluginName() == node.opType && core->getPluginVersion() == version && core->getPluginNamespace() == ns,
        "plugin name/version/namespace equal the node's");

    std::map<std::string, double> const serialized = serializedFields(plugin.get());
    check(serialized == nodeFields && serialized.size() == fieldTypes.size(),
        "getFieldsToSerialize returns the node's " + std::to_string(nodeFields.size()) + " INT/FLOAT attributes");
    std::unique_ptr<IPluginV3> deserialized(creator->createPlugin("harness_node", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    check(deserialized && serializedFields(deserialized.get()) == serialized,
        "createPlugin (runtime phase) from the serialized fields round-trips");
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && serializedFields(cloned.get()) == serialized, "clone keeps the fields");

    PluginFieldCollection const missing{0, nullptr};
    check(creator->createPlugin("harness_node", &missing, TensorRTPhase::kBUILD) == nullptr, "createPlugin refuses a node without the attributes");
    if (!node.floats.empty())
    {
        float const notANumber = std::nanf("");
        auto withNaN = fields;
        for (auto& field : withNaN)
        {
            if (field.type == PluginFieldType::kFLOAT32)
            {
                field.data = &notANumber;
                break;
            }
        }
        PluginFieldCollection const nanFc{static_cast<int32_t>(withNaN.size()), withNaN.data()};
        check(creator->createPlugin("harness_node", &nanFc, TensorRTPhase::kBUILD) == nullptr,
            "createPlugin refuses a NaN FLOAT attribute");
    }

    int32_t const nbInputs = static_cast<int32_t>(node.inputs.size());
    int32_t const nbOutputs = static_cast<int32_t>(node.outputs.size());
    check(build->getNbOutputs() == nbOutputs, "getNbOutputs = " + std::to_string(nbOutputs));

    std::vector<std::string> roles = node.inputs;
    roles.insert(roles.end(), node.outputs.begin(), node.outputs.end());
    for (DataType activation : {DataType::kFLOAT, DataType::kHALF})
    {
        std::string const typeName = activation == DataType::kFLOAT ? "float32" : "float16";
        std::vector<DataType> inputTypes;
        for (auto const& role : node.inputs)
        {
            inputTypes.push_back(isStateOrParameter(role) ? DataType::kFLOAT : activation);
        }
        std::vector<DataType> outputTypes(nbOutputs);
        bool typesOk = build->getOutputDataTypes(outputTypes.data(), nbOutputs, inputTypes.data(), nbInputs) == 0;
        for (int32_t i = 0; i < nbOutputs; ++i)
        {
            typesOk = typesOk && outputTypes[i] == (isStateOrParameter(node.outputs[i]) ? DataType::kFLOAT : activation);
        }
        check(typesOk, "getOutputDataTypes with " + typeName + " activations");

        std::vector<DynamicPluginTensorDesc> inOut(roles.size());
        for (size_t pos = 0; pos < roles.size(); ++pos)
        {
            inOut[pos].desc.type = isStateOrParameter(roles[pos]) ? DataType::kFLOAT : activation;
            inOut[pos].desc.format = TensorFormat::kLINEAR;
        }
        bool accepted = true;
        for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
        {
            accepted = accepted && build->supportsFormatCombination(pos, inOut.data(), nbInputs, nbOutputs);
        }
        check(accepted, "supportsFormatCombination accepts " + typeName + " activations, float32 parameters/state");
        bool rejected = true;
        for (int32_t pos = 1; pos < nbInputs + nbOutputs; ++pos)
        {
            auto wrong = inOut;
            wrong[pos].desc.type = isStateOrParameter(roles[pos]) ? DataType::kHALF
                                                                  : (activation == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT);
            rejected = rejected && !build->supportsFormatCombination(pos, wrong.data(), nbInputs, nbOutputs);
            wrong[pos] = inOut[pos];
            wrong[pos].desc.format = TensorFormat::kCHW32;
            rejected = rejected && !build->supportsFormatCombination(pos, wrong.data(), nbInputs, nbOutputs);
        }
        check(rejected, "supportsFormatCombination rejects mixed activation types, half parameters, non-linear formats");
    }

    // Shapes: batch and length are runtime dimensions, the model's sizes build-time constants; a
    // decode step is the same node at length 1.
    std::set<std::string> used;
    for (auto const& [role, shape] : roleShapes(node))
    {
        if (std::find(roles.begin(), roles.end(), role) != roles.end())
        {
            used.insert(shape.begin(), shape.end());
        }
    }
    Sizes const prefill{{"batch", -1}, {"length", -1}, {"dim", 64}, {"dstate", 16},
        {"heads", 6}, {"headdim", 10}, {"groups", 2}};
    Sizes decode = prefill;
    decode["length"] = 1;
    check(outputShapesFollow(build, node, prefill), "getOutputShapes (" + describe(prefill, used) + ")");
    check(outputShapesFollow(build, node, decode), "getOutputShapes, decode step (" + describe(decode, used) + ")");

    Sizes maxima = prefill;
    maxima["batch"] = 8;
    maxima["length"] = 4096;
    check(configure(build, node, prefill, maxima) == 0, "configurePlugin accepts " + describe(maxima, used));
    auto tooLarge = maxima;
    tooLarge["dstate"] = MQ_SCAN_MAX_DSTATE + 1;
    std::string const tooManyStates = std::to_string(MQ_SCAN_MAX_DSTATE + 1);
    check(configure(build, node, prefill, tooLarge) != 0, "configurePlugin refuses d_state " + tooManyStates);
    if (used.count("groups"))
    {
        auto uneven = prefill;
        uneven["groups"] = 4;
        check(configure(build, node, uneven, uneven) != 0, "configurePlugin refuses 4 groups for 6 heads");
    }
    auto step = decode;
    step["batch"] = 2;
    check(shapeChange(runtime, node, step) == 0, "onShapeChange accepts a decode step (" + describe(step, used) + ")");
    auto longer = step;
    longer["length"] = 300;
    check(shapeChange(runtime, node, longer) == 0, "onShapeChange accepts " + describe(longer, used));
    longer["dstate"] = MQ_SCAN_MAX_DSTATE + 1;
    check(shapeChange(runtime, node, longer) != 0, "onShapeChange refuses d_state " + tooManyStates);

    int deviceCount = 0;
    if (cudaGetDeviceCount(&deviceCount) != cudaSuccess || deviceCount == 0)
    {
        std::cout << "[skip] enqueue: no CUDA device\n";
    }
    else if (referenceDir.empty())
    {
        std::cout << "[skip] enqueue: no reference directory given\n";
    }
    else
    {
        compareWithReference(runtime, node, referenceDir);
    }
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 3 || argc > 4)
    {
        std::cerr << "usage: " << argv[0] << " PLUGIN_SO NODE_FILE [REFERENCE_DIR]\n";
        return 2;
    }
    try
    {
        int const status = run(argv[1], argv[2], argc == 4 ? argv[3] : "");
        std::cout << "harness: " << gPassed << " checks passed, " << gFailures << " failed\n";
        return status != 0 || gFailures > 0 ? 1 : 0;
    }
    catch (std::exception const& error)
    {
        std::cerr << "harness: " << error.what() << "\n";
        return 1;
    }
}
