// ONNX Runtime custom-op library: the project's scan ops (domain mq_export) as native CPU kernels.
//
// Each kernel reads the node's tensors in the op's own layout (no copies), fills the C kernel's
// strided parameter struct and runs the same fused C kernel PyTorch calls (selective_scan_cpu.c,
// ssd_scan_cpu.c), so ORT, PyTorch and the function body share one definition of the math. Work
// units (batch element × channel block / head) are spread over ORT's intra-op threads with
// KernelContext_ParallelFor. Op names, attributes (flags as INT, the SSD Δ limits as FLOAT) and
// input order come from mq_ort_spec.h, which mq_export/runtime/ort_native.py generates from
// mq_export/ops/spec.py at build time. Built and loaded by ort_native.py; entry point
// RegisterCustomOps (SessionOptions.register_custom_ops_library).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "mq_ort_spec.h"
#include "selective_scan_cpu.h"
extern "C" {   // a C header without C++ guards
#include "ssd_scan_cpu.h"
}

namespace {

// Kernel invocations per op, read by the tests through mq_ort_kernel_calls: they prove that ORT ran
// the registered kernel and not the model's function body.
std::atomic<int64_t> g_calls[mq_spec::kNumOps];

// A task below about this many state updates (steps × state size × channels) is not worth handing
// to another thread: a decode step (length 1) then runs inline.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// The node's attribute values and where each optional input / output sits, from its flags.
class NodeLayout {
 public:
  NodeLayout(const mq_spec::Op& op, const OrtKernelInfo* info) : op_(op) {
    for (int i = 0; i < op.num_attributes; ++i) {
      const mq_spec::Attribute& a = op.attributes[i];
      double value = a.default_value;   // absent: the spec's default (e.g. files from before a flag existed)
      if (a.is_float) {
        float f;
        if (OrtStatus* s = Ort::GetApi().KernelInfoGetAttribute_float(info, a.name, &f)) Ort::GetApi().ReleaseStatus(s);
        else value = f;
      } else {
        int64_t v;
        if (OrtStatus* s = Ort::GetApi().KernelInfoGetAttribute_int64(info, a.name, &v)) Ort::GetApi().ReleaseStatus(s);
        else value = static_cast<double>(v);
      }
      values_.push_back(value);
    }
    inputs_ = positions(op.inputs, op.num_inputs);
    outputs_ = positions(op.outputs, op.num_outputs);
  }

  double attribute(const char* name) const { return values_[attribute_index(name)]; }
  bool flag(const char* name) const { return attribute(name) != 0.0; }
  // Position of `role` among the node's inputs (outputs), -1 when its flag leaves it out.
  int input(const char* role) const { return inputs_[role_index(op_.inputs, op_.num_inputs, role)]; }
  int output(const char* role) const { return outputs_[role_index(op_.outputs, op_.num_outputs, role)]; }

 private:
  int attribute_index(const char* name) const {
    for (int i = 0; i < op_.num_attributes; ++i)
      if (std::strcmp(op_.attributes[i].name, name) == 0) return i;
    throw std::logic_error(std::string("no attribute ") + name + " in the " + op_.op_type + " spec");
  }
  static int role_index(const mq_spec::Role* roles, int count, const char* role) {
    for (int i = 0; i < count; ++i)
      if (std::strcmp(roles[i].name, role) == 0) return i;
    throw std::logic_error(std::string("no tensor ") + role + " in the spec");
  }
  std::vector<int> positions(const mq_spec::Role* roles, int count) const {
    std::vector<int> out;
    int next = 0;
    for (int i = 0; i < count; ++i)
      out.push_back(roles[i].gating_attribute < 0 || values_[roles[i].gating_attribute] != 0.0 ? next++ : -1);
    return out;
  }

  const mq_spec::Op& op_;
  std::vector<double> values_;
  std::vector<int> inputs_, outputs_;
};

// Shapes, checked against each other; a mismatch is the user's error, reported by ORT as such.
struct Shape {
  std::vector<int64_t> dims;
  int64_t operator[](size_t i) const { return dims[i]; }
};

Shape shape_of(const Ort::ConstValue& value, size_t rank, const char* op, const char* role) {
  Shape s{value.GetTensorTypeAndShapeInfo().GetShape()};
  if (s.dims.size() != rank)
    throw std::invalid_argument(std::string(op) + " input " + role + " has rank " + std::to_string(s.dims.size()) +
                                ", expected " + std::to_string(rank));
  return s;
}

void expect(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

// Runs units [0, units) of a C kernel over ORT's intra-op threads in contiguous ranges.
template <typename Params>
struct Work {
  const Params* params;
  int (*run)(const Params*, int64_t, int64_t);
  int64_t units, tasks;
  std::atomic<int> status{0};

  static void task(void* data, size_t i) {
    auto* w = static_cast<Work*>(data);
    const int64_t begin = w->units * static_cast<int64_t>(i) / w->tasks;
    const int64_t end = w->units * (static_cast<int64_t>(i) + 1) / w->tasks;
    if (int s = w->run(w->params, begin, end)) w->status = s;
  }
};

template <typename Params>
int run_parallel(Ort::KernelContext& ctx, const Params& params, int (*run)(const Params*, int64_t, int64_t),
                 int64_t units, int64_t work_per_unit) {
  if (units <= 0) return 0;
  Work<Params> work{&params, run, units, std::clamp<int64_t>(units * work_per_unit / kMinTaskWork, 1, units)};
  if (work.tasks == 1) return run(&params, 0, units);
  ctx.ParallelFor(&Work<Params>::task, static_cast<size_t>(work.tasks), 0, &work);
  return work.status.load();
}

// Points each of the kernel's input fields at the node's tensor of that role (NULL when absent).
template <typename Params>
void bind_inputs(Ort::KernelContext& ctx, const NodeLayout& layout, Params& p,
                 std::initializer_list<std::pair<const char*, const float* Params::*>> fields) {
  for (const auto& [role, field] : fields) {
    const int index = layout.input(role);
    p.*field = index < 0 ? nullptr : ctx.GetInput(static_cast<size_t>(index)).GetTensorData<float>();
  }
}

// The output of `role` with these dims, or NULL when the node does not have it.
float* bind_output(Ort::KernelContext& ctx, const NodeLayout& layout, const char* role, const std::vector<int64_t>& dims) {
  const int index = layout.output(role);
  return index < 0 ? nullptr : ctx.GetOutput(static_cast<size_t>(index), dims).GetTensorMutableData<float>();
}

// ---------------------------------------------------------------- SelectiveScan (Mamba-1)

struct SelectiveScanKernel {
  explicit SelectiveScanKernel(const OrtKernelInfo* info) : layout(mq_spec::kSelectiveScan, info) {}

  void Compute(Ort::KernelContext& ctx) const {
    const char* op = mq_spec::kSelectiveScan.op_type;
    const Shape u = shape_of(ctx.GetInput(layout.input("u")), 3, op, "u");   // (b, d, l)
    const Shape A = shape_of(ctx.GetInput(layout.input("A")), 2, op, "A");   // (d, n)
    const int64_t b = u[0], d = u[1], l = u[2], n = A[1];
    expect(A[0] == d, op, "A must be (d, d_state) with d = u's channels");
    expect(n >= 1 && n <= MQ_CPU_SCAN_MAX_DSTATE, op, "d_state must be in [1, " + std::to_string(MQ_CPU_SCAN_MAX_DSTATE) + "]");
    for (const char* role : {"delta", "z"})
      if (layout.input(role) >= 0) expect(shape_of(ctx.GetInput(layout.input(role)), 3, op, role).dims == u.dims, op,
                                          std::string(role) + " must have u's shape");
    for (const char* role : {"B", "C"}) {
      const Shape s = shape_of(ctx.GetInput(layout.input(role)), 3, op, role);
      expect(s[0] == b && s[1] == n && s[2] == l, op, std::string(role) + " must be (b, d_state, l)");
    }
    for (const char* role : {"D", "delta_bias"})
      if (layout.input(role) >= 0) expect(shape_of(ctx.GetInput(layout.input(role)), 1, op, role)[0] == d, op,
                                          std::string(role) + " must be (d)");
    if (layout.input("initial_state") >= 0) {
      const Shape s = shape_of(ctx.GetInput(layout.input("initial_state")), 3, op, "initial_state");
      expect(s[0] == b && s[1] == d && s[2] == n, op, "initial_state must be (b, d, d_state)");
    }

    using P = mq_cpu_scan_params;
    P p{};
    bind_inputs<P>(ctx, layout, p, {{"u", &P::u}, {"delta", &P::delta}, {"A", &P::A}, {"B", &P::B}, {"C", &P::C},
                                    {"D", &P::D}, {"z", &P::z}, {"delta_bias", &P::delta_bias}, {"initial_state", &P::h0}});
    p.y = bind_output(ctx, layout, "y", u.dims);
    p.h_last = bind_output(ctx, layout, "final_state", {b, d, n});
    // The op's (b, d, l) and (b, n, l) tensors, contiguous: unit step stride.
    p.u_sb = p.delta_sb = p.z_sb = p.y_sb = d * l;
    p.u_sd = p.delta_sd = p.z_sd = p.y_sd = l;
    p.u_st = p.delta_st = p.z_st = p.y_st = 1;
    p.B_sb = p.C_sb = n * l;
    p.B_sn = p.C_sn = l;
    p.B_st = p.C_st = 1;
    p.batch = b;
    p.dim = d;
    p.length = l;
    p.dstate = n;
    p.delta_softplus = layout.flag("delta_softplus");
    p.reverse = layout.flag("reverse");
    const int64_t units = mq_cpu_scan_units(&p);
    const int64_t channels_per_unit = units > 0 ? b * d / units + 1 : 1;
    if (int status = run_parallel(ctx, p, &mq_cpu_scan, units, l * n * channels_per_unit))
      throw std::runtime_error(std::string(op) + ": CPU kernel failed with status " + std::to_string(status));
  }

  NodeLayout layout;
};

// ---------------------------------------------------------------- SSDScan (Mamba-2)

template <size_t N>
void contiguous_strides(const std::vector<int64_t>& dims, int64_t (&strides)[N]) {
  int64_t stride = 1;
  for (size_t i = N; i-- > 0;) {
    strides[i] = stride;
    stride *= dims[i];
  }
}

struct SSDScanKernel {
  explicit SSDScanKernel(const OrtKernelInfo* info) : layout(mq_spec::kSSDScan, info) {}

  void Compute(Ort::KernelContext& ctx) const {
    const char* op = mq_spec::kSSDScan.op_type;
    const Shape x = shape_of(ctx.GetInput(layout.input("x")), 4, op, "x");   // (b, l, h, p)
    const Shape B = shape_of(ctx.GetInput(layout.input("B")), 4, op, "B");   // (b, l, g, n)
    const int64_t b = x[0], l = x[1], h = x[2], hp = x[3], g = B[2], n = B[3];
    expect(B[0] == b && B[1] == l && g >= 1 && h % g == 0, op, "B must be (b, l, groups, d_state) with groups dividing heads");
    expect(n >= 1 && n <= MQ_SSD_SCAN_MAX_DSTATE, op, "d_state must be in [1, " + std::to_string(MQ_SSD_SCAN_MAX_DSTATE) + "]");
    expect(shape_of(ctx.GetInput(layout.input("C")), 4, op, "C").dims == B.dims, op, "C must have B's shape");
    expect(shape_of(ctx.GetInput(layout.input("dt")), 3, op, "dt").dims == std::vector<int64_t>{b, l, h}, op,
           "dt must be (b, l, heads)");
    expect(shape_of(ctx.GetInput(layout.input("A")), 1, op, "A")[0] == h, op, "A must be (heads)");
    if (layout.input("z") >= 0) expect(shape_of(ctx.GetInput(layout.input("z")), 4, op, "z").dims == x.dims, op, "z must have x's shape");
    if (layout.input("dt_bias") >= 0)
      expect(shape_of(ctx.GetInput(layout.input("dt_bias")), 1, op, "dt_bias")[0] == h, op, "dt_bias must be (heads)");
    const bool D_has_hdim = layout.flag("D_has_hdim");
    if (layout.input("D") >= 0) {
      const Shape D = shape_of(ctx.GetInput(layout.input("D")), D_has_hdim ? 2 : 1, op, "D");
      expect(D[0] == h && (!D_has_hdim || D[1] == hp), op, D_has_hdim ? "D must be (heads, headdim)" : "D must be (heads)");
    }
    const std::vector<int64_t> state_dims{b, h, hp, n};
    if (layout.input("initial_state") >= 0)
      expect(shape_of(ctx.GetInput(layout.input("initial_state")), 4, op, "initial_state").dims == state_dims, op,
             "initial_state must be (b, heads, headdim, d_state)");

    using P = mq_ssd_scan_params;
    P p{};
    bind_inputs<P>(ctx, layout, p, {{"x", &P::x}, {"dt", &P::dt}, {"A", &P::A}, {"B", &P::B}, {"C", &P::C},
                                    {"D", &P::D}, {"z", &P::z}, {"dt_bias", &P::dt_bias}, {"initial_state", &P::h0}});
    p.y = bind_output(ctx, layout, "y", x.dims);
    p.h_last = bind_output(ctx, layout, "final_state", state_dims);
    contiguous_strides(x.dims, p.x_strides);
    contiguous_strides(x.dims, p.y_strides);
    if (p.z) contiguous_strides(x.dims, p.z_strides);
    contiguous_strides({b, l, h}, p.dt_strides);
    contiguous_strides(B.dims, p.B_strides);
    contiguous_strides(B.dims, p.C_strides);
    p.batch = b;
    p.length = l;
    p.heads = h;
    p.headdim = hp;
    p.groups = g;
    p.dstate = n;
    p.dt_softplus = layout.flag("dt_softplus");
    p.D_has_hdim = D_has_hdim;
    p.dt_min = static_cast<float>(layout.attribute("dt_min"));
    p.dt_max = static_cast<float>(layout.attribute("dt_max"));
    if (int status = run_parallel(ctx, p, &mq_ssd_scan, mq_ssd_scan_units(&p), l * hp * n))
      throw std::runtime_error(std::string(op) + ": CPU kernel failed with status " + std::to_string(status));
  }

  NodeLayout layout;
};

// ---------------------------------------------------------------- op registration

template <typename Kernel, int OpIndex>
struct ScanOp : Ort::CustomOpBase<ScanOp<Kernel, OpIndex>, Kernel, /*WithStatus=*/true> {
  static const mq_spec::Op& spec() { return *mq_spec::kOps[OpIndex]; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }

  const char* GetName() const { return spec().op_type; }
  size_t GetInputTypeCount() const { return static_cast<size_t>(spec().num_inputs); }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return spec().inputs[i].gating_attribute < 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return static_cast<size_t>(spec().num_outputs); }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return spec().outputs[i].gating_attribute < 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// Kernel::Compute wrapped for ORT: counted, and errors returned as a status (never thrown into ORT).
template <typename Kernel, int OpIndex>
struct Counted : Kernel {
  using Kernel::Kernel;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    g_calls[OpIndex].fetch_add(1, std::memory_order_relaxed);
    try {
      Ort::KernelContext ctx(context);
      this->Compute(ctx);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::invalid_argument& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }
};

using SelectiveScanOp = ScanOp<Counted<SelectiveScanKernel, mq_spec::kSelectiveScanIndex>, mq_spec::kSelectiveScanIndex>;
using SSDScanOp = ScanOp<Counted<SSDScanKernel, mq_spec::kSSDScanIndex>, mq_spec::kSSDScanIndex>;

// A session keeps a pointer to the domain it was given, so domains live as long as the library.
std::mutex g_domains_mutex;
std::vector<Ort::CustomOpDomain>& domains() {
  static std::vector<Ort::CustomOpDomain>* all = new std::vector<Ort::CustomOpDomain>;   // never destroyed:
  return *all;   // ORT may release sessions after static destructors run
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;   // older runtime than the headers: nothing can be reported through it
  Ort::InitApi(api);
  static SelectiveScanOp selective_scan_op;
  static SSDScanOp ssd_scan_op;
  try {
    Ort::CustomOpDomain domain(mq_spec::kDomain);
    domain.Add(&selective_scan_op);
    domain.Add(&ssd_scan_op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    domains().push_back(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}

// How many times the kernel of `op_type` ran in this process (-1: not in this library).
__attribute__((visibility("default"))) int64_t mq_ort_kernel_calls(const char* op_type) {
  for (int i = 0; i < mq_spec::kNumOps; ++i)
    if (mq_spec::kOps[i] != nullptr && std::strcmp(mq_spec::kOps[i]->op_type, op_type) == 0)
      return g_calls[i].load();
  return -1;
}

}  // extern "C"
