// Exercises libmq_trt_plugins.so the way TensorRT's ONNX parser and runtime would, without any
// TensorRT library: everything called here is virtual or inline in the TensorRT headers.
//
//   mq_plugin_harness PLUGIN_SO NODE_FILE [REFERENCE_DIR]
//
// NODE_FILE describes one exported node (written by mq_export.plugin_spec), one entry per line:
//   op_type SelectiveScan | int NAME VALUE | string NAME VALUE | inputs NAME... | outputs NAME...
// REFERENCE_DIR (optional, used only when a CUDA device exists) holds shape.txt with
// "batch dim length dstate" and float32 little-endian NAME.bin files for every input and output.
#include "mq_scan.h"

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
        else if (kind == "int" || kind == "string")
        {
            std::string name;
            std::string value;
            words >> name >> value;
            if (kind == "int")
            {
                node.ints.emplace_back(name, std::stoi(value));
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
    static std::set<std::string> const kFloat32Roles{"A", "D", "delta_bias", "initial_state", "final_state"};
    return kFloat32Roles.count(role) > 0;
}

std::map<std::string, int32_t> intFields(PluginFieldCollection const* fc)
{
    std::map<std::string, int32_t> values;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.type == PluginFieldType::kINT32 && field.length == 1)
        {
            values[field.name] = *static_cast<int32_t const*>(field.data);
        }
    }
    return values;
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
    int64_t batch = 0, dim = 0, length = 0, dstate = 0;
    shapeFile >> batch >> dim >> length >> dstate;
    std::map<std::string, Dims> shapes{{"u", Dims3(batch, dim, length)}, {"delta", Dims3(batch, dim, length)},
        {"z", Dims3(batch, dim, length)}, {"y", Dims3(batch, dim, length)}, {"A", Dims2(dim, dstate)},
        {"B", Dims3(batch, dstate, length)}, {"C", Dims3(batch, dstate, length)}, {"D", Dims{1, {dim}}},
        {"delta_bias", Dims{1, {dim}}}, {"initial_state", Dims3(batch, dim, dstate)},
        {"final_state", Dims3(batch, dim, dstate)}};

    std::vector<void*> buffers;
    auto tensors = [&](std::vector<std::string> const& roles, bool upload) {
        std::vector<PluginTensorDesc> descs;
        std::vector<void*> pointers;
        for (auto const& role : roles)
        {
            Dims const& shape = shapes.at(role);
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
    IPluginCreatorV3One* creator = nullptr;
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0
            && static_cast<IPluginCreatorV3One*>(creators[i])->getPluginName() == node.opType)
        {
            creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        }
    }
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
    // INT as kINT32 and STRING as kCHAR.
    std::set<std::string> fieldNames;
    PluginFieldCollection const* names = creator->getFieldNames();
    for (int32_t i = 0; i < names->nbFields; ++i)
    {
        fieldNames.insert(names->fields[i].name);
    }
    std::vector<PluginField> fields;
    for (auto const& [name, value] : node.ints)
    {
        if (fieldNames.count(name))
        {
            fields.emplace_back(name.c_str(), &value, PluginFieldType::kINT32, 1);
        }
    }
    for (auto const& [name, value] : node.strings)
    {
        if (fieldNames.count(name))
        {
            fields.emplace_back(name.c_str(), value.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(value.size()));
        }
    }
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

    std::map<std::string, int32_t> const serialized = intFields(runtime->getFieldsToSerialize());
    bool fieldsKept = true;
    for (auto const& [name, value] : node.ints)
    {
        fieldsKept = fieldsKept && (!fieldNames.count(name) || (serialized.count(name) && serialized.at(name) == value));
    }
    check(fieldsKept && serialized.size() == fieldNames.size(), "getFieldsToSerialize returns the node's attributes");
    std::unique_ptr<IPluginV3> deserialized(creator->createPlugin("harness_node", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    check(deserialized && intFields(static_cast<IPluginV3OneRuntime*>(deserialized->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize()) == serialized,
        "createPlugin (runtime phase) from the serialized fields round-trips");
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && intFields(static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize()) == serialized,
        "clone keeps the fields");

    PluginFieldCollection const missing{0, nullptr};
    check(creator->createPlugin("harness_node", &missing, TensorRTPhase::kBUILD) == nullptr, "createPlugin refuses a node without the attributes");

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

    // Shapes: batch and length are runtime dimensions, dim and dstate build-time constants.
    FakeDimension batch(-1), dim(64), length(-1), dstate(16), one(1);
    auto exprs = [](std::vector<IDimensionExpr const*> const& dims) {
        DimsExprs e{};
        e.nbDims = static_cast<int32_t>(dims.size());
        std::copy(dims.begin(), dims.end(), e.d);
        return e;
    };
    std::vector<DimsExprs> inputs;
    for (auto const& role : node.inputs)
    {
        inputs.push_back(role == "A" ? exprs({&dim, &dstate})
                : (role == "D" || role == "delta_bias") ? exprs({&dim})
                : (role == "B" || role == "C")          ? exprs({&batch, &dstate, &length})
                : role == "initial_state"               ? exprs({&batch, &dim, &dstate})
                                                        : exprs({&batch, &dim, &length}));
    }
    std::vector<DimsExprs> outputs(nbOutputs);
    NullExprBuilder builder;
    bool shapesOk = build->getOutputShapes(inputs.data(), nbInputs, nullptr, 0, outputs.data(), nbOutputs, builder) == 0;
    std::vector<IDimensionExpr const*> const expectedY{&batch, &dim, &length};
    std::vector<IDimensionExpr const*> const expectedState{&batch, &dim, &dstate};
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        auto const& expected = node.outputs[i] == "final_state" ? expectedState : expectedY;
        shapesOk = shapesOk && outputs[i].nbDims == 3 && std::equal(expected.begin(), expected.end(), outputs[i].d);
    }
    check(shapesOk, "getOutputShapes: y (batch, dim, length), final_state (batch, dim, dstate)");

    std::vector<DynamicPluginTensorDesc> ranges(nbInputs + nbOutputs);
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        ranges[pos].max = roles[pos] == "A" ? Dims2(64, 16) : Dims3(8, 64, 4096);
    }
    check(build->configurePlugin(ranges.data(), nbInputs, ranges.data() + nbInputs, nbOutputs) == 0, "configurePlugin accepts d_state 16");
    auto const aPos = std::find(roles.begin(), roles.end(), "A") - roles.begin();
    ranges[aPos].max = Dims2(64, MQ_SCAN_MAX_DSTATE + 1);
    check(build->configurePlugin(ranges.data(), nbInputs, ranges.data() + nbInputs, nbOutputs) != 0,
        "configurePlugin refuses d_state " + std::to_string(MQ_SCAN_MAX_DSTATE + 1));

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
