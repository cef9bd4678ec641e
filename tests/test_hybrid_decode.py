"""Stateful decoding of the five hybrid families (a KV cache beside the Mamba state), on small
random transformers configs saved with save_pretrained: our prefill + one-token steps equal our
full-sequence forward; transformers' own cached greedy `generate` picks our tokens; `export
--decode` + greedy ONNX Runtime generation equals PyTorch's for 64 tokens (through the Python API,
`mq-export export --decode` and `mq-export generate --compare`); the TensorRT shape profiles of a
hybrid step graph."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

import mq_export
from mq_export import MQExportError
from mq_export.commands.cli import main
from mq_export.export.decode import export_decode
from mq_export.load.charlm import CharTokenizer
from mq_export.models.registry import family_of
from mq_export.runtime.decode import OrtDecoder, TorchDecoder, generate
from mq_export.runtime.engine import equivalent_commands, parse_profile
from tests.test_hybrid_bamba import save_bamba
from tests.test_hybrid_falcon_h1 import save_falcon_h1
from tests.test_hybrid_granite import MOE, save_granite
from tests.test_hybrid_jamba import save_jamba
from tests.test_hybrid_nemotron_h import VOCAB, relative_error, save_nemotron_h

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")

MAMBA, KV = ("conv_state", "ssm_state"), ("key", "value")
NO_DT_LIMIT = (0.0, float("inf"))
# Each family's test config (tests/test_hybrid_*.py, odd sizes) cut to a few layers of every kind.
# transformers' single-token cache path of the Mamba-2 families clamps no Δ (it passes neither
# time_step_limit nor Nemotron-H's time_step_min to its state update; its full-sequence path
# does), so these configs leave Δ unlimited (Nemotron-H: a time_step_min of 1e-9, which softplus
# never reaches here, as transformers cannot initialise a model with 0) and transformers' cached
# generation computes what its full forward does.
FAMILIES = {
    "nemotron-h": (save_nemotron_h, dict(layers_block_type=["linear_attention", "full_attention", "mlp"],
                                         time_step_min=1e-9), ((0, MAMBA), (1, KV))),
    "bamba": (save_bamba, dict(num_hidden_layers=2, attn_layer_indices=[1], time_step_limit=NO_DT_LIMIT),
              ((0, MAMBA), (1, KV))),
    "granite-hybrid": (save_granite, dict(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                                          time_step_limit=NO_DT_LIMIT, **MOE), ((0, KV), (1, MAMBA))),
    "falcon-h1": (save_falcon_h1, dict(num_hidden_layers=1, time_step_limit=NO_DT_LIMIT), ((0, MAMBA + KV),)),
    "jamba": (save_jamba, dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                               expert_layer_offset=1), ((0, MAMBA), (1, KV))),
}
PROMPT = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family name → (its name, checkpoint directory, transformers' model, ours loaded from the
    directory), each saved once per module."""
    saved = {}

    def get(name: str):
        if name not in saved:
            save, overrides, _ = FAMILIES[name]
            directory = tmp_path_factory.mktemp(name)
            reference = save(directory, **overrides)
            saved[name] = name, directory, reference, mq_export.load(directory)
        return saved[name]
    return get


@pytest.fixture(params=list(FAMILIES))
def saved(request, checkpoint):
    return checkpoint(request.param)


def test_state_layout_and_zero_state(saved):
    """Mamba layers carry conv/SSM states, attention layers key/value caches (FP32, batch × kv_heads
    × 0 × head_dim at first), MLP-only layers nothing, each by its index in the model."""
    name, _, _, model = saved
    layout = family_of(model).state_layout(model)
    assert layout == FAMILIES[name][2]
    attention = model.cfg.attention
    zero = model.zero_state(3)
    assert [len(layer) for layer in zero] == [len(kinds) for _, kinds in layout]
    caches = [t for (_, kinds), layer in zip(layout, zero) for kind, t in zip(kinds, layer) if kind in KV]
    assert caches and all(tuple(t.shape) == (3, attention.kv_heads, 0, attention.head_dim) for t in caches)
    assert all(t.dtype == torch.float32 and not t.any() for layer in zero for t in layer)


def assert_steps_equal_the_full_forward(model) -> None:
    """Prefill (1 token: shorter than the conv window; or 5) then one token at a time: the logits of
    the full-sequence forward, the caches grown to the whole sequence."""
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(ids)
        for prefix in (1, 5):
            logits, state = model(ids[:, :prefix], model.zero_state(2))
            pieces = [logits]
            for t in range(prefix, ids.shape[1]):
                logits, state = model(ids[:, t:t + 1], state)
                pieces.append(logits)
            assert relative_error(torch.cat(pieces, 1), full) <= 1e-5
    layout = family_of(model).state_layout(model)
    lengths = {t.shape[2] for (_, kinds), layer in zip(layout, state) for kind, t in zip(kinds, layer) if kind in KV}
    assert lengths == {ids.shape[1]}


def test_prefill_and_steps_equal_the_full_forward(saved):
    assert_steps_equal_the_full_forward(saved[3])


@pytest.mark.parametrize("save", [save_nemotron_h, save_bamba], ids=["nemotron-h", "bamba"])
def test_prefill_and_steps_equal_the_full_forward_with_dt_limits(save, tmp_path):
    """The test configs' Δ limits (time_step_min 0.05; time_step_limit (0.02, 2)) hold in every
    step as in the full forward."""
    save(tmp_path)
    assert_steps_equal_the_full_forward(mq_export.load(tmp_path))


def test_transformers_cached_generation_picks_our_tokens(saved):
    """transformers' greedy `generate` with its own cache (Mamba states + KV cache, one token per
    step after the prompt) against our PyTorch decoding: the same 24 tokens, the same logits."""
    _, _, reference, model = saved
    with torch.no_grad():
        out = reference.generate(PROMPT[None], attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False, use_cache=True, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens, logits = generate(TorchDecoder(model), PROMPT, 24, VOCAB)
    assert tokens == out.sequences[0, len(PROMPT):].tolist()
    assert relative_error(logits, torch.cat(out.logits)) <= 1e-4


def assert_ort_generation_equals_pytorch(model, step, prefill, tokens: int = 64) -> None:
    """Greedy generation of `tokens` tokens through the ORT graphs = PyTorch's (the same tokens,
    logits along the way within 1e-4 of the largest; the deviation is printed)."""
    ort_tokens, ort_logits = generate(OrtDecoder(step, prefill), PROMPT, tokens, VOCAB)
    torch_tokens, torch_logits = generate(TorchDecoder(model), PROMPT, tokens, VOCAB)
    assert ort_tokens == torch_tokens
    deviation = relative_error(ort_logits, torch_logits)
    print(f"ORT vs PyTorch, {tokens} greedy tokens: max |Δlogit| / max |logit| = {deviation:.2e}")
    assert deviation <= 1e-4


@pytest.mark.parametrize("name", ["bamba", "granite-hybrid", "jamba"])    # the others: through the CLI below
def test_python_api_decode_graphs_generate_like_pytorch(checkpoint, name, tmp_path):
    """export_decode: per layer past_/present_ state names in layout order, the caches'
    past_length dynamic; greedy ORT generation (prefill with empty caches) = PyTorch for 64 tokens."""
    model = checkpoint(name)[3]
    ex = export_decode(model, tmp_path)
    graph = onnx.load(str(ex.step)).graph
    layout = FAMILIES[name][2]
    assert [i.name for i in graph.input] == ["input_ids", *(f"past_{k}.{i}" for i, kinds in layout for k in kinds)]
    assert [o.name for o in graph.output] == ["logits", *(f"present_{k}.{i}" for i, kinds in layout for k in kinds)]
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output]}
    attention = model.cfg.attention
    kv_index = next(i for i, kinds in layout if kinds == KV)
    assert shapes[f"past_key.{kv_index}"] == ["batch", attention.kv_heads, "past_length", attention.head_dim]
    assert shapes[f"present_value.{kv_index}"] == ["batch", attention.kv_heads, "present_length", attention.head_dim]
    assert shapes["input_ids"] == ["batch", 1]
    assert_ort_generation_equals_pytorch(model, ex.step, ex.prefill)


def trtexec_shapes(*dims: tuple[int, int, int]) -> str:
    """trtexec's --minShapes, --optShapes and --maxShapes for the Nemotron-H decode graphs at
    (batch, length, past_length) each: input_ids, layer 0's Mamba states, layer 1's caches."""
    return " ".join(f"--{kind}Shapes=input_ids:{b}x{length},past_conv_state.0:{b}x58x2,past_ssm_state.0:{b}x6x5x7,"
                    f"past_key.1:{b}x2x{past}x5,past_value.1:{b}x2x{past}x5"
                    for kind, (b, length, past) in zip(("min", "opt", "max"), dims))


def test_cli_export_decode_and_tensorrt_profiles(checkpoint, tmp_path):
    """`mq-export export DIR --method none --decode` on Nemotron-H: report.json's decode check, the
    graphs' greedy generation = PyTorch for 64 tokens, and build-engine --print-commands with the
    default past_length ranges (prefill from empty caches, steps from at least one token)."""
    _, directory, _, model = checkpoint("nemotron-h")
    out = tmp_path / "out"
    assert main(["export", str(directory), "-o", str(out), "--method", "none", "--decode", "--json"]) == 0
    check = json.loads((out / "report.json").read_text())["settings"]["decode"]["check"]
    assert check["argmax_agreement_vs_pytorch"] == 1.0 and check["max_abs_error_vs_pytorch"] <= 1e-4
    assert_ort_generation_equals_pytorch(model, out / "decode_step.onnx", out / "prefill.onnx")

    with pytest.raises(MQExportError, match="dynamic dimension 'batch'"):    # past_length has a default, batch not
        equivalent_commands(out / "decode_step.onnx", "p.so", "step.engine")
    step = equivalent_commands(out / "decode_step.onnx", "p.so", "step.engine",
                               profile=parse_profile("batch=1:2:4"))["trtexec_build"]
    assert trtexec_shapes((1, 1, 1), (2, 1, 512), (4, 1, 4096)) in step
    prefill = equivalent_commands(out / "prefill.onnx", "p.so", "prefill.engine",
                                  profile=parse_profile("batch=1:1:2,length=1:64:256"))["trtexec_build"]
    assert trtexec_shapes((1, 1, 0), (1, 64, 0), (2, 256, 4096)) in prefill
    chosen = equivalent_commands(out / "decode_step.onnx", "p.so", "step.engine",
                                 profile=parse_profile("batch=1:1:1,past_length=0:8:16"))["polygraphy_build"]
    # batch fixed at 1: only the caches stay dynamic.
    assert chosen.endswith("--trt-min-shapes 'past_key.1:[1,2,0,5]' 'past_value.1:[1,2,0,5]' "
                           "--trt-opt-shapes 'past_key.1:[1,2,8,5]' 'past_value.1:[1,2,8,5]' "
                           "--trt-max-shapes 'past_key.1:[1,2,16,5]' 'past_value.1:[1,2,16,5]'")


def test_cli_generate_compares_ort_with_pytorch(checkpoint, capsys):
    """`mq-export generate` on a hybrid LM directory with a vocab.json, ONNX Runtime backend with
    --compare: the same 64 greedy tokens as PyTorch (Falcon-H1: Mamba-2 and attention state in one
    layer)."""
    directory = checkpoint("falcon-h1")[1]
    CharTokenizer("".join(chr(ord("A") + i) for i in range(VOCAB))).save(directory / "vocab.json")
    assert main(["generate", "--model", str(directory), "--prompt", "HYBRID", "--tokens", "64", "--greedy",
                 "--backend", "onnxruntime", "--compare", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    compared = result["compare_torch"]
    print(f"generate --compare: max |Δlogit| = {compared['max_abs_logit_deviation']:.2e}")
    assert compared["tokens_equal"] and compared["max_abs_logit_deviation"] <= 1e-4
    assert len(result["tokens"]) == 64
