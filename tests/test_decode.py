"""Stateful decoding on small random LMs: PyTorch state carry-over, the exported prefill/step
graphs in ONNX Runtime, and greedy generation equality."""
from __future__ import annotations

import onnx
import pytest
import torch

from mq_export.export.decode import export_decode, state_names
from mq_export.runtime.decode import OrtDecoder, TorchDecoder, check_decode, generate
from mq_export.errors import MQExportError
from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig
from mq_export.models.registry import family_of
from mq_export.ops.spec import SCAN_DOMAIN, SCAN_OP_TYPE


def random_lm(seed: int = 0, d_conv: int = 4) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    model = MambaLMHeadModel(LMConfig(MixerConfig(16, d_state=4, d_conv=d_conv), n_layer=2, vocab_size=11))
    with torch.no_grad():   # random Δ biases, so states decay at different rates per channel
        for block in model.backbone.layers:
            block.mixer.dt_proj.bias.normal_(-2, 1)
    return model.eval()


@pytest.mark.parametrize("prefix, d_conv", [(0, 4), (2, 4), (5, 4), (1, 2)])
def test_state_carried_over_steps_equals_full_sequence(prefix: int, d_conv: int) -> None:
    """Prefill `prefix` tokens (0: start from the zero state), then one token per step: the
    logits equal the full-sequence forward's, including prefixes shorter than the conv window."""
    model = random_lm(d_conv=d_conv)
    ids = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        full = model(ids)
        state = model.zero_state(3)
        pieces = []
        if prefix:
            logits, state = model(ids[:, :prefix], state)
            pieces.append(logits)
        for t in range(prefix, ids.shape[1]):
            logits, state = model(ids[:, t:t + 1], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_state_shapes() -> None:
    model = random_lm()
    _, state = model(torch.zeros(2, 3, dtype=torch.long), model.zero_state(2))
    assert [tuple(t.shape) for t in state[0]] == [(2, 32, 3), (2, 32, 4)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_lm(seed=1)
    return model, export_decode(model, tmp_path_factory.mktemp("decode"))


def test_step_graph_io_names_and_scan_node(exported) -> None:
    model, ex = exported
    proto = onnx.load(str(ex.step))
    assert [i.name for i in proto.graph.input] == ["input_ids", "past_conv_state.0", "past_ssm_state.0",
                                                   "past_conv_state.1", "past_ssm_state.1"]
    assert [o.name for o in proto.graph.output] == ["logits", *state_names(family_of(model).state_layout(model),
                                                                           "present")]
    assert state_names(((1, ("conv_state", "ssm_state")),), "present") == ["present_conv_state.1",
                                                                           "present_ssm_state.1"]
    length = proto.graph.input[0].type.tensor_type.shape.dim[1]
    assert length.dim_value == 1
    scans = [n for n in proto.graph.node if n.domain == SCAN_DOMAIN and n.op_type == SCAN_OP_TYPE]
    assert len(scans) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in scans[0].attribute}
    assert attrs["has_initial_state"] == 1 and attrs["return_last_state"] == 1


def test_ort_prefill_then_steps_equals_full_sequence(exported) -> None:
    model, ex = exported
    ids = torch.randint(0, 11, (2, 10))
    with torch.no_grad():
        full = model(ids)
    decoder = OrtDecoder(ex.step, ex.prefill, threads=1)
    pieces = [decoder.prefill(ids[:, :3])] + [decoder.step(ids[:, t:t + 1]) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_ort_equals_torch(exported) -> None:
    model, ex = exported
    prompt = torch.tensor([1, 2, 3])
    torch_tokens, torch_logits = generate(TorchDecoder(model), prompt, 40, vocab_size=11)
    ort_tokens, ort_logits = generate(OrtDecoder(ex.step, ex.prefill, threads=1), prompt, 40, vocab_size=11)
    assert ort_tokens == torch_tokens
    torch.testing.assert_close(ort_logits, torch_logits, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded() -> None:
    model = random_lm()
    first = generate(TorchDecoder(model), torch.tensor([0]), 10, 11, greedy=False, seed=3)[0]
    again = generate(TorchDecoder(model), torch.tensor([0]), 10, 11, greedy=False, seed=3)[0]
    assert first == again and all(0 <= t < 11 for t in first)


def test_check_decode_reports_agreement(exported) -> None:
    model, ex = exported
    check = check_decode(model, ex, torch.randint(0, 11, (2, 12)), prefix=4)
    assert check["max_abs_error_vs_pytorch"] < 1e-4 and check["argmax_agreement_vs_pytorch"] == 1.0


def test_export_decode_refuses_a_classifier(tmp_path) -> None:
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER
    from mq_export.commands.export import run_export
    with pytest.raises(MQExportError, match="--decode"):
        run_export(BUNDLED_CLASSIFIER, tmp_path / "out", decode=True)
    assert not (tmp_path / "out").exists()
