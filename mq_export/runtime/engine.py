"""TensorRT engine build and validation for exported models with SelectiveScan nodes.

The TensorRT Python package is imported only inside these functions; without it they raise a
one-line MQExportError. Graphs with QuantizeLinear/DequantizeLinear are built as strongly typed
networks (types come from the graph, as TensorRT's explicit quantization requires); FP32 graphs
may be built with the FP16 builder flag.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from mq_export.errors import MQExportError, error_reason
from mq_export.ops.spec import OP_SPECS, SCAN_DOMAIN

if TYPE_CHECKING:
    import numpy as np

MIN_TENSORRT = (10, 3)
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class DimRange:
    """Range of one dynamic ONNX dimension (by its dim_param name) in an optimization profile."""

    min: int
    opt: int
    max: int


Profile = Mapping[str, DimRange]
InputShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

# The key/value caches' past_length in export --decode's graphs, where a profile does not give it:
# prefill.onnx starts from empty caches (TensorRT takes 0-size dimensions: 0 <= min <= opt <= max),
# decode_step.onnx continues a sequence of at least one token. --profile past_length=… overrides.
PREFILL_PAST_LENGTH = DimRange(0, 0, 4096)
STEP_PAST_LENGTH = DimRange(1, 512, 4096)


@dataclass(frozen=True)
class OutputComparison:
    """One output of an engine against ONNX Runtime's: passed when max |trt − ort| <= atol + rtol · max |ort|."""
    name: str
    max_abs_error: float
    max_reference: float
    passed: bool

    @classmethod
    def of(cls, name: str, got: np.ndarray, expected: np.ndarray, rtol: float = 1e-2,
           atol: float = 1e-3) -> OutputComparison:
        import numpy as np

        max_error = float(np.abs(got.astype(np.float32) - expected.astype(np.float32)).max(initial=0.0))
        max_reference = float(np.abs(expected.astype(np.float32)).max(initial=0.0))
        return cls(name, max_error, max_reference, max_error <= atol + rtol * max_reference)


def parse_profile(text: str) -> dict[str, DimRange]:
    """`batch=1:8:32,length=1:784:784` -> {"batch": DimRange(1, 8, 32), ...} (CLI --profile)."""
    profile = {}
    for item in filter(None, text.split(",")):
        name, _, values = item.partition("=")
        try:
            low, opt, high = (int(v) for v in values.split(":"))
        except ValueError:
            raise MQExportError(f"profile entry {item!r} is not NAME=MIN:OPT:MAX") from None
        if not 0 <= low <= opt <= high or high < 1:
            raise MQExportError(f"profile entry {item!r} needs 0 <= MIN <= OPT <= MAX, MAX >= 1")
        profile[name.strip()] = DimRange(low, opt, high)
    return profile


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MQExportError("TensorRT Python package 'tensorrt' is not installed; install TensorRT >= 10.3 "
                            "(JetPack 6 ships it; on a desktop `pip install tensorrt`) to build or run engines") from None
    version = tuple(int(part) for part in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise MQExportError(f"TensorRT {trt.__version__} is too old; the SelectiveScan plugin needs >= 10.3 (IPluginV3)")
    return trt


_loaded_plugin_libraries: set[str] = set()


def _load_plugin(trt, plugin_path: str | Path) -> None:
    # The registry refuses a library whose creators are already registered: load each once.
    path = str(Path(plugin_path).resolve())
    if path in _loaded_plugin_libraries:
        return
    if not Path(path).is_file():
        raise MQExportError(f"TensorRT plugin library not found: {path} (build plugins/ with -DTENSORRT_ROOT)")
    if trt.get_plugin_registry().load_library(path) is None:
        raise MQExportError(f"TensorRT could not load plugin library {path}; see the TensorRT log")
    _loaded_plugin_libraries.add(path)


def load_onnx(onnx_path: str | Path):
    """The ONNX model at `onnx_path` (its external data left unloaded), or one line saying why the
    path is not one; callers check it before TensorRT or ONNX Runtime see the file."""
    import onnx

    path = Path(onnx_path)
    if path.is_dir():
        raise MQExportError(f"{path} is a directory; pass the exported .onnx file in it (e.g. {path / 'model.onnx'})")
    if not path.is_file():
        raise MQExportError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: any unreadable file
        raise MQExportError(f"{path} is not an ONNX model ({error_reason(exc)})") from None
    # Protobuf parses many short byte strings (an empty file among them) as a message with no graph.
    if not model.graph.node or not model.graph.output:
        raise MQExportError(f"{path} is not an ONNX model (no graph in it)")
    return model


def is_quantized(model) -> bool:
    """Whether the graph has Q/DQ nodes, i.e. must be built strongly typed."""
    return any(node.op_type in _QDQ_OPS for node in model.graph.node)


def default_profile(model) -> dict[str, DimRange]:
    """The ranges `model` gets where a profile is silent: past_length in a decode graph (a step
    graph's input_ids have length 1, a prefill graph's a dynamic length)."""
    from mq_export.export.decode import PAST_LENGTH

    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    if not any(d.dim_param == PAST_LENGTH for shape in dims.values() for d in shape):
        return {}
    step = [d.dim_value for d in dims.get("input_ids", ())][1:] == [1]
    return {PAST_LENGTH: STEP_PAST_LENGTH if step else PREFILL_PAST_LENGTH}


def input_shapes(model, profile: Profile) -> InputShapes:
    """(min, opt, max) shape of every graph input, dynamic dims taken from `profile` by dim_param
    (or from `default_profile`)."""
    profile = {**default_profile(model), **profile}
    initializers = {init.name for init in model.graph.initializer}
    shapes: InputShapes = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims: list[tuple[int, int, int]] = []
        for dim in graph_input.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append((dim.dim_value,) * 3)
            elif dim.dim_param in profile:
                r = profile[dim.dim_param]
                dims.append((r.min, r.opt, r.max))
            else:
                name = dim.dim_param or "?"
                raise MQExportError(f"input '{graph_input.name}' has dynamic dimension '{name}': give its range, "
                                    f"e.g. --profile {name}=1:8:32")
        shapes[graph_input.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


def build_engine(onnx_path: str | Path, plugin_path: str | Path, out_path: str | Path, fp16: bool = False,
                 profiles: Sequence[Profile] = ({},), workspace_bytes: int | None = None) -> Path:
    """Builds and writes a serialized engine; returns `out_path`.

    profiles: one optimization profile per entry, each mapping dim_param names to DimRange.
    """
    model = load_onnx(onnx_path)
    out = Path(out_path)
    if out.is_dir():
        raise MQExportError(f"-o {out} is a directory; give the engine file to write (e.g. {out / 'model.engine'})")
    if not out.parent.is_dir():
        raise MQExportError(f"cannot write {out}: directory {out.parent} does not exist")
    quantized = is_quantized(model)
    if fp16 and quantized:
        raise MQExportError("--fp16 applies to FP32 graphs only; this Q/DQ graph is built strongly typed "
                            "with the types it carries")
    all_shapes = [input_shapes(model, profile) for profile in profiles]
    trt = _tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    _load_plugin(trt, plugin_path)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if quantized else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # 10.15+: take the registered plugin over the node's local function (older versions do so
    # anyway when the node has plugin_version/plugin_namespace attributes).
    if hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise MQExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    scan_nodes = sum(node.domain == SCAN_DOMAIN and node.op_type in OP_SPECS for node in model.graph.node)
    plugin_layers = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if plugin_layers < scan_nodes:
        raise MQExportError(f"{scan_nodes} scan nodes ({', '.join(OP_SPECS)}) but {plugin_layers} plugin layers: "
                            "TensorRT used the function bodies; check the nodes' plugin_version/plugin_namespace "
                            "attributes")

    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for shapes in all_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MQExportError(f"TensorRT could not build an engine from {onnx_path}; see the TensorRT log above")
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(bytes(serialized))
    partial.replace(out)  # never a half-written engine under the final name
    return out


class EngineForward:
    """A logits function over a TensorRT engine (`evaluate.Forward`: torch batch in, CPU torch
    logits out), so an engine is scored over a split like every other backend. The engine's
    single input and output are those of export's model.onnx."""

    def __init__(self, engine_path: str | Path, plugin_path: str | Path) -> None:
        trt = _tensorrt()
        if not Path(engine_path).is_file():
            raise MQExportError(f"engine file not found: {engine_path} (build it with mq-export build-engine)")
        import numpy as np
        import torch

        if not torch.cuda.is_available():
            raise MQExportError("running an engine needs a CUDA device")
        _load_plugin(trt, plugin_path)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(engine_path).read_bytes())
        if self.engine is None:
            raise MQExportError(f"TensorRT could not load engine {engine_path} (built by another TensorRT version "
                                f"or device?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise MQExportError(f"{engine_path} has {len(inputs)} inputs and {len(outputs)} outputs; engines of "
                                f"export's model.onnx have one of each")
        (self.input_name,), (self.output_name,) = inputs, outputs
        # The largest batch the first optimization profile accepts: callers batch no larger.
        self.max_batch = self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        self.output_dtype = torch.from_numpy(
            np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))).dtype
        self.context = self.engine.create_execution_context()
        self.engine_path = engine_path

    def __call__(self, x):
        import torch

        x = x.contiguous().cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise MQExportError(f"TensorRT failed to run {self.engine_path}")
        stream.synchronize()
        return out.float().cpu()


def equivalent_commands(onnx_path: str | Path, plugin_path: str | Path, out_path: str | Path, fp16: bool = False,
                        profile: Profile | None = None) -> dict[str, str]:
    """trtexec and polygraphy command lines doing what build_engine and `validate --engine` do (one profile)."""
    model = load_onnx(onnx_path)
    dynamic = {name: s for name, s in input_shapes(model, profile or {}).items() if s[0] != s[2]}
    precision = ["--stronglyTyped"] if is_quantized(model) else (["--fp16"] if fp16 else [])
    polygraphy_precision = ["--strongly-typed"] if is_quantized(model) else (["--fp16"] if fp16 else [])
    trtexec_shapes, polygraphy_shapes = [], []
    for index, kind in enumerate(("min", "opt", "max")) if dynamic else ():
        trtexec_shapes.append(f"--{kind}Shapes=" + ",".join(
            f"{name}:{'x'.join(map(str, s[index]))}" for name, s in dynamic.items()))
        polygraphy_shapes += [f"--trt-{kind}-shapes",
                              *(f"{name}:[{','.join(map(str, s[index]))}]" for name, s in dynamic.items())]

    def command(*tokens) -> str:
        return " ".join(shlex.quote(str(token)) for token in tokens)

    return {
        "trtexec_build": command("trtexec", f"--onnx={onnx_path}", f"--dynamicPlugins={plugin_path}",
                                 f"--saveEngine={out_path}", *precision, *trtexec_shapes),
        "trtexec_run": command("trtexec", f"--loadEngine={out_path}", f"--dynamicPlugins={plugin_path}"),
        "polygraphy_build": command("polygraphy", "convert", onnx_path, "--plugins", plugin_path, "-o", out_path,
                                    *polygraphy_precision, *polygraphy_shapes),
        "polygraphy_compare": command("polygraphy", "run", onnx_path, "--trt", "--onnxrt", "--plugins", plugin_path,
                                      *polygraphy_precision, *polygraphy_shapes),
    }
