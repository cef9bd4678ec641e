"""Plain-text description of one SelectiveScan node, read by the C++ plugin harness.

Format, one entry per line: `op_type NAME`, `int NAME VALUE`, `string NAME VALUE`,
`inputs ROLE...`, `outputs ROLE...` (roles as in SelectiveScanSpec.input_names/output_names).
The same text comes from a spec (before an exporter exists) or from an exported ONNX node.
"""
from __future__ import annotations

import dataclasses

from mq_export.ops.spec import SCAN_OP_TYPE, SelectiveScanSpec


def node_description(op_type: str, attributes: dict[str, int | str]) -> str:
    """Description of a node with these ONNX attributes; roles follow from its has_* flags."""
    flags = {f.name: bool(attributes[f.name]) for f in dataclasses.fields(SelectiveScanSpec)}
    spec = SelectiveScanSpec(**flags)
    lines = [f"op_type {op_type}"]
    for name, value in sorted(attributes.items()):  # canonical order: ONNX nodes sort attributes
        if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"attribute {name}={value!r}: empty or whitespace strings cannot be described")
        lines.append(f"{'string' if isinstance(value, str) else 'int'} {name} {value}")
    lines.append("inputs " + " ".join(spec.input_names()))
    lines.append("outputs " + " ".join(spec.output_names()))
    return "\n".join(lines) + "\n"


def spec_node_description(spec: SelectiveScanSpec) -> str:
    return node_description(SCAN_OP_TYPE, spec.attributes())


def onnx_node_description(node) -> str:
    """Description of an exported onnx.NodeProto (INT and STRING attributes, as TensorRT reads them)."""
    import onnx

    attributes: dict[str, int | str] = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if attribute.type == onnx.AttributeProto.INT:
            attributes[attribute.name] = int(value)
        elif attribute.type == onnx.AttributeProto.STRING:
            attributes[attribute.name] = value.decode()
    return node_description(node.op_type, attributes)
