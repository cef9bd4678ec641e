"""The one contract between the exporter, ONNX Runtime kernels and the TensorRT plugin.

Every other place (the ONNX exporter, the onnxruntime-extensions kernel, the generated C++
header the plugin harness reads) derives op names and attributes from here.
"""
from __future__ import annotations

from dataclasses import dataclass

# ONNX domain of the custom node. TensorRT's parser ignores the domain and looks the plugin
# up by (op_type, plugin_version, plugin_namespace), so those three must equal the creator's.
SCAN_DOMAIN = "mq_export"
SCAN_DOMAIN_VERSION = 1
SCAN_OP_TYPE = "SelectiveScan"
SCAN_PLUGIN_VERSION = "1"
SCAN_PLUGIN_NAMESPACE = "mq_export"


@dataclass(frozen=True)
class SelectiveScanSpec:
    """Static settings of one SelectiveScan node (its integer attributes).

    Inputs, in order, absent ones omitted: u (b,d,l), delta (b,d,l), A (d,n), B (b,n,l),
    C (b,n,l), D (d), z (b,d,l), delta_bias (d), initial_state (b,d,n).
    Outputs: y (b,d,l), then final_state (b,d,n) when return_last_state.
    """

    delta_softplus: bool = True
    has_D: bool = True
    has_z: bool = True
    has_delta_bias: bool = True
    has_initial_state: bool = False
    return_last_state: bool = False

    def input_names(self) -> list[str]:
        names = ["u", "delta", "A", "B", "C"]
        for flag, name in ((self.has_D, "D"), (self.has_z, "z"), (self.has_delta_bias, "delta_bias"),
                           (self.has_initial_state, "initial_state")):
            if flag:
                names.append(name)
        return names

    def output_names(self) -> list[str]:
        return ["y", "final_state"] if self.return_last_state else ["y"]

    def attributes(self) -> dict[str, int | str]:
        """ONNX node attributes: the flags as ints plus the plugin lookup keys."""
        return {
            "delta_softplus": int(self.delta_softplus),
            "has_D": int(self.has_D),
            "has_z": int(self.has_z),
            "has_delta_bias": int(self.has_delta_bias),
            "has_initial_state": int(self.has_initial_state),
            "return_last_state": int(self.return_last_state),
            "plugin_version": SCAN_PLUGIN_VERSION,
            "plugin_namespace": SCAN_PLUGIN_NAMESPACE,
        }
