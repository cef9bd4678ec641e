"""Plain-text description of one plugin node (SelectiveScan or SSDScan), read by the C++ plugin harness.

Format, one entry per line: `op_type NAME`, `int NAME VALUE`, `float NAME VALUE` (the shortest
decimal of its float32 value, as ONNX stores and TensorRT reads it; `inf` for an unbounded limit),
`string NAME VALUE`, `inputs ROLE...`, `outputs ROLE...` (roles as
in the spec's input_names/output_names). The same text comes from a spec (before an exporter
exists) or from an exported ONNX node.
"""
from __future__ import annotations

import dataclasses
import struct

from mq_export.ops.spec import OP_SPECS


def float32_text(value: float) -> str:
    """Shortest decimal that reads back as the same float32 as `value`."""
    def float32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    rounded = float32(value)
    return next(text for text in (f"{rounded:.{digits}g}" for digits in range(1, 10))
                if float32(float(text)) == rounded)


def node_description(op_type: str, attributes: dict[str, int | float | str]) -> str:
    """Description of a node with these ONNX attributes; roles follow from its has_* flags."""
    spec_class = OP_SPECS[op_type]
    defaults = spec_class()
    spec = spec_class(**{f.name: type(getattr(defaults, f.name))(attributes[f.name])
                         for f in dataclasses.fields(spec_class)})
    lines = [f"op_type {op_type}"]
    for name, value in sorted(attributes.items()):  # canonical order: ONNX nodes sort attributes
        if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"attribute {name}={value!r}: empty or whitespace strings cannot be described")
        kind = "string" if isinstance(value, str) else "float" if isinstance(value, float) else "int"
        lines.append(f"{kind} {name} {float32_text(value) if kind == 'float' else value}")
    lines.append("inputs " + " ".join(spec.input_names()))
    lines.append("outputs " + " ".join(spec.output_names()))
    return "\n".join(lines) + "\n"


def spec_node_description(spec: SelectiveScanSpec | SSDScanSpec) -> str:
    return node_description(spec.op_type, spec.attributes())


def onnx_node_description(node) -> str:
    """Description of an exported onnx.NodeProto (INT, FLOAT and STRING attributes, as TensorRT reads them)."""
    import onnx

    readers = {onnx.AttributeProto.INT: int, onnx.AttributeProto.FLOAT: float,
               onnx.AttributeProto.STRING: bytes.decode}
    attributes: dict[str, int | float | str] = {
        attribute.name: readers[attribute.type](onnx.helper.get_attribute_value(attribute))
        for attribute in node.attribute if attribute.type in readers}
    return node_description(node.op_type, attributes)
