"""The one contract between the exporter, ONNX Runtime kernels and the TensorRT plugin.

Every other place (the ONNX exporter, the ONNX Runtime kernels, the generated C++ header the
plugin and its harness read) derives op names, attributes and input order from here. Standard
library only: the plugin's CMake runs this file with a Python that need not have torch.
"""
from __future__ import annotations

import math
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
    reverse: the recurrence runs from the last step to the first (the state at step t depends on
    steps t..l-1; y stays in input order), as the backward branch of a bidirectional (Vision
    Mamba) mixer needs; initial_state enters at the last step and final_state is the state after
    step 0. Equal to flipping the time axis of u, delta, B, C, z, scanning forward, flipping y.
    """

    delta_softplus: bool = True
    has_D: bool = True
    has_z: bool = True
    has_delta_bias: bool = True
    has_initial_state: bool = False
    return_last_state: bool = False
    reverse: bool = False

    op_type = SCAN_OP_TYPE
    plugin_version = SCAN_PLUGIN_VERSION

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
            "reverse": int(self.reverse),
            "plugin_version": SCAN_PLUGIN_VERSION,
            "plugin_namespace": SCAN_PLUGIN_NAMESPACE,
        }


SSD_OP_TYPE = "SSDScan"
SSD_PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class SSDScanSpec:
    """Static settings of one SSDScan node (Mamba-2's scan, mamba-ssm's `mamba_chunk_scan_combined`).

    Inputs, in order, absent ones omitted: x (b,l,h,p), dt (b,l,h), A (h), B (b,l,g,n),
    C (b,l,g,n) with g dividing h, D (h) — or (h,p) when D_has_hdim —, z (b,l,h,p), dt_bias (h),
    initial_state (b,h,p,n). Outputs: y (b,l,h,p), then final_state (b,h,p,n) when
    return_final_state. Δ = clamp(softplus?(dt + dt_bias), dt_min, dt_max); dt_max = inf: no upper
    limit. Integer attributes are the flags; dt_min/dt_max are FLOAT attributes.
    """

    dt_softplus: bool = True
    has_D: bool = True
    D_has_hdim: bool = False
    has_z: bool = False
    has_dt_bias: bool = True
    has_initial_state: bool = False
    return_final_state: bool = False
    dt_min: float = 0.0
    dt_max: float = math.inf

    op_type = SSD_OP_TYPE
    plugin_version = SSD_PLUGIN_VERSION

    def input_names(self) -> list[str]:
        names = ["x", "dt", "A", "B", "C"]
        for flag, name in ((self.has_D, "D"), (self.has_z, "z"), (self.has_dt_bias, "dt_bias"),
                           (self.has_initial_state, "initial_state")):
            if flag:
                names.append(name)
        return names

    def output_names(self) -> list[str]:
        return ["y", "final_state"] if self.return_final_state else ["y"]

    def attributes(self) -> dict[str, int | float | str]:
        """ONNX node attributes: the flags as ints, the Δ limits as floats, the plugin lookup keys."""
        return {
            "dt_softplus": int(self.dt_softplus),
            "has_D": int(self.has_D),
            "D_has_hdim": int(self.D_has_hdim),
            "has_z": int(self.has_z),
            "has_dt_bias": int(self.has_dt_bias),
            "has_initial_state": int(self.has_initial_state),
            "return_final_state": int(self.return_final_state),
            "dt_min": float(self.dt_min),
            "dt_max": float(self.dt_max),
            "plugin_version": SSD_PLUGIN_VERSION,
            "plugin_namespace": SCAN_PLUGIN_NAMESPACE,
        }


# Every op of the contract, by op_type: what the plugin description and the ORT library enumerate.
OP_SPECS = {spec_class.op_type: spec_class for spec_class in (SelectiveScanSpec, SSDScanSpec)}
