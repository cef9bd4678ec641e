"""Nemotron-H (hybrid Mamba-2 + attention + MLP layers) loaded from transformers' save_pretrained
directories: logits against transformers' own CPU forward in PyTorch and ONNX Runtime (exported
through the CLI and the Python API), and the one-line refusals of what this step does not do."""
from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch

import mq_export
from mq_export import MQExportError
from mq_export.commands.cli import main
from mq_export.models.nemotron_h import NemotronHLM
from mq_export.runtime.ort import OrtForward, session

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

VOCAB = 53
CHUNK = 4
# Odd sizes: 6 Mamba heads of 5 channels in 2 groups (30 channels, not expand × hidden_size = 48),
# 6 query heads of 5 channels sharing 2 kv heads, a state of 7; every layer kind twice.
CONFIG = dict(vocab_size=VOCAB, hidden_size=24, layers_block_type=["linear_attention", "full_attention", "mlp",
                                                                   "linear_attention", "mlp", "full_attention"],
              num_attention_heads=6, num_key_value_heads=2, head_dim=5, intermediate_size=20, mamba_num_heads=6,
              mamba_head_dim=5, n_groups=2, ssm_state_size=7, conv_kernel=3, chunk_size=CHUNK, time_step_min=0.05,
              use_conv_bias=True, use_bias=True, mlp_bias=True)
MAMBA_LAYERS = 2


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def save_random(model_class, config, directory, seed: int = 0, **save_options):
    """transformers' `model_class` on `config`, every parameter perturbed (HF initialises D, dt_bias
    and the norms to plain constants), saved with save_pretrained into `directory`."""
    torch.manual_seed(seed)
    reference = model_class(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.3 * torch.randn_like(param))
    reference.save_pretrained(directory, **save_options)
    return reference


def edited_config(directory, **settings) -> None:
    """Rewrite `directory`'s config.json with `settings` (a value None removes the key)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in settings.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def assert_exported_graph(path, ssd_nodes: int) -> None:
    """One graph: `ssd_nodes` SSDScan nodes of the project domain, everything else (attention
    included) standard ONNX ops, batch and length dynamic."""
    model = onnx.load(str(path))
    ops = Counter((node.domain, node.op_type) for node in model.graph.node)
    assert ops[("mq_export", "SSDScan")] == ssd_nodes
    assert {domain for domain, _ in ops} == {"", "mq_export"}
    assert ops[("", "Softmax")] >= 1 and ops[("", "MatMul")] >= 1
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "length"]


def assert_ort_matches(path, reference, batch: int = 3, length: int = 2 * CHUNK + 3, scan: str | None = None) -> None:
    """ONNX Runtime's logits on `path` (`scan`: the session's scan implementation) = transformers' at
    a batch and length (not a multiple of the chunk size) other than the export's example."""
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = reference(ids).logits
    assert relative_error(OrtForward(session(path, scan=scan))(ids), expected) <= 1e-4


def assert_cli_export_matches(directory, out, reference, ssd_nodes: int) -> dict:
    """`mq-export export DIR -o OUT --method none`: the graph as assert_exported_graph says, ONNX
    Runtime = transformers; returns report.json's export settings."""
    assert main(["export", str(directory), "-o", str(out), "--method", "none", "--json"]) == 0
    onnx_settings = json.loads((out / "report.json").read_text())["settings"]["onnx"]
    assert onnx_settings["ssd_scan_nodes"] == ssd_nodes
    assert_exported_graph(out / "model.onnx", ssd_nodes)
    assert_ort_matches(out / "model.onnx", reference)
    return onnx_settings


def assert_api_export_matches(directory, path, reference, ssd_nodes: int) -> None:
    """The Python API's load → export_onnx: ONNX Runtime = transformers at batch 1, the scans run by
    the graph's own SSDScan function bodies (the CLI's check runs the native kernels)."""
    info = mq_export.export_onnx(mq_export.load(directory), path)
    assert info["ssd_scan_nodes"] == ssd_nodes
    assert_ort_matches(path, reference, batch=1, length=CHUNK * 3 + 1, scan="function_body")


def assert_one_line_refusal(call, match: str) -> None:
    with pytest.raises(MQExportError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def copied_checkpoint(directory, tmp_path, **settings):
    """A copy of the checkpoint in `directory` into `tmp_path`, its config edited with `settings`
    (as edited_config takes them)."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    edited_config(tmp_path, **settings)
    return tmp_path


def assert_load_refused(directory, tmp_path, settings: dict, named: str) -> None:
    """A copy of the checkpoint in `directory` with `settings` fails to load with one line naming
    what it does not support."""
    assert_one_line_refusal(lambda: mq_export.load(copied_checkpoint(directory, tmp_path, **settings)), named)


def save_nemotron_h(directory, **overrides):
    config = transformers.NemotronHConfig(**{**CONFIG, **overrides})
    return save_random(transformers.NemotronHForCausalLM, config, directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nemotron_h")
    return directory, save_nemotron_h(directory)


def test_logits_match_transformers(saved):
    directory, reference = saved
    model = mq_export.load(directory)
    assert type(model) is NemotronHLM
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers] == \
        ["Mamba2Mixer", "Attention", "MLP", "Mamba2Mixer", "MLP", "Attention"]
    for length in (CHUNK * 2 + 3, 30):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = reference(ids).logits
            assert relative_error(model(ids), expected) <= 1e-4


def test_hybrid_override_pattern_and_older_setting_names(tmp_path):
    """Checkpoints written before transformers 5 spell the layers as a pattern string and some
    Mamba settings with a mamba_ prefix (transformers reads those in preference)."""
    reference = save_nemotron_h(tmp_path, n_groups=3, conv_kernel=4)
    edited_config(tmp_path, layers_block_type=None, hybrid_override_pattern="M*-M-*", n_groups=8,
                  mamba_n_groups=3, conv_kernel=2, mamba_d_conv=4)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(mq_export.load(tmp_path)(ids), reference(ids).logits) <= 1e-4


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_mlp_activations(tmp_path, activation):
    reference = save_nemotron_h(tmp_path, mlp_hidden_act=activation)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(mq_export.load(tmp_path)(ids), reference(ids).logits) <= 1e-4


def test_cli_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    onnx_settings = assert_cli_export_matches(directory, tmp_path / "out", reference, MAMBA_LAYERS)
    assert onnx_settings["ssd_scan_spec"]["dt_min"] == CONFIG["time_step_min"]


def test_python_api_export_runs_in_onnxruntime_like_transformers(saved, tmp_path):
    directory, reference = saved
    assert_api_export_matches(directory, tmp_path / "model.onnx", reference, MAMBA_LAYERS)


def test_cli_quantized_export(saved, tmp_path):
    """Quantizing works through the CLI (the methods, per family: tests/test_hybrid_quant.py); head_dim
    5 has no Hadamard matrix, so a rotating method is refused in one line naming it."""
    directory, _ = saved
    calib = tmp_path / "calib.pt"
    torch.save(torch.randint(0, VOCAB, (4, 16)), calib)
    assert main(["export", str(directory), "-o", str(tmp_path / "q"), "--method", "rtn", "--calib", str(calib)]) == 0
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert main(["export", str(directory), "-o", str(tmp_path / "h"), "--method", "hadamard", "--calib",
                 str(calib)]) == 2
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("settings, named", [
    (dict(layers_block_type=["linear_attention", "sliding_attention"]), "unknown layer types"),
    (dict(mamba_hidden_act="gelu"), "mamba_hidden_act"),
    (dict(mlp_hidden_act="tanh"), "mlp_hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
    (dict(n_groups=4), "n_groups 4 does not divide mamba_num_heads 6"),
    (dict(num_key_value_heads=4), "num_key_value_heads 4"),
    (dict(time_step_min=-1), "time_step_min"),
])
def test_unsupported_setting_is_one_line_naming_it(saved, tmp_path, settings, named):
    assert_load_refused(saved[0], tmp_path, settings, named)
