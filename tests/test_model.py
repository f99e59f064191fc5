"""megapico's PicoDecoder at TP=1 against the plain reference implementation of the spec."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference_pico import ReferencePicoDecoder

from megapico.config import MODEL_PRESETS, ModelConfig
from megapico.model import PicoDecoder

SMALL = ModelConfig(d_model=48, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4,
                    activation_hidden_dim=96, vocab_size=256, max_seq_len=32)


def _pair(config, seed=42):
    torch.manual_seed(seed)
    ours = PicoDecoder(config)
    torch.manual_seed(seed)
    reference = ReferencePicoDecoder(config)
    return ours, reference


def test_tiny_parameter_count_and_state_dict_matches_pico():
    model = PicoDecoder(MODEL_PRESETS["tiny"])
    assert sum(p.numel() for p in model.parameters()) == 11_282_784
    reference = ReferencePicoDecoder(MODEL_PRESETS["tiny"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert list(ours) == list(theirs)  # same keys, same order (pico's module creation order)
    assert ours == theirs
    assert ours["embedding_proj.weight"] == (50304, 96)
    assert ours["layers.0.attention.k_proj.weight"] == (32, 96)
    assert ours["layers.11.swiglu.w_2.weight"] == (96, 384)


def test_same_seed_gives_pico_initial_weights():
    ours, reference = _pair(SMALL)
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("seq_len", [1, 7, SMALL.max_seq_len])
def test_logits_and_loss_match_reference(seq_len):
    ours, reference = _pair(SMALL)
    input_ids = torch.randint(0, SMALL.vocab_size, (3, seq_len))
    labels = torch.randint(0, SMALL.vocab_size, (3, seq_len))
    labels[0, 0] = -100
    logits = ours(input_ids)
    expected = reference(input_ids)
    assert logits.dtype == torch.float32 and logits.shape == (3, seq_len, SMALL.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    expected_loss = F.cross_entropy(expected.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(ours(input_ids, labels), expected_loss, atol=1e-5, rtol=0)


def test_gradients_match_reference():
    ours, reference = _pair(SMALL)
    input_ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    labels = torch.randint(0, SMALL.vocab_size, (2, 16))
    ours(input_ids, labels).backward()
    F.cross_entropy(reference(input_ids).flatten(0, 1), labels.flatten()).backward()
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=0, msg=name)


def test_tiny_preset_at_full_context_matches_reference():
    config = dataclasses.replace(MODEL_PRESETS["tiny"], n_layers=1)
    ours, reference = _pair(config)
    input_ids = torch.randint(0, config.vocab_size, (1, config.max_seq_len))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids), atol=1e-5, rtol=0)


def test_longer_than_max_seq_len_is_refused():
    model = PicoDecoder(SMALL)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


def test_models_share_no_state():
    """pico's class-level RoPE cache tied instances together; ours must not."""
    a = PicoDecoder(SMALL)
    b = PicoDecoder(dataclasses.replace(SMALL, position_emb_theta=500.0))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, SMALL.vocab_size, (1, 8))
    assert not torch.allclose(a(x), b(x))
    assert not any(True for _ in a.buffers())


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_down_projection_equals_autograd_and_keeps_only_gate_and_up(autocast):
    """w_2(silu(gate) * up) with silu and w_2's input recomputed in backward: the same output and gradients as
    autograd over the plain expression (fp32, and bf16 autocast as in bf16-mixed), and only gate and up saved."""
    from megapico.model.pico_decoder import SwiGLUDownProjection

    torch.manual_seed(0)
    projection = SwiGLUDownProjection(64, 16)
    gate, up = (torch.randn(2, 5, 64) for _ in range(2))
    results = []
    for fused in (False, True):
        projection.zero_grad()
        inputs = [t.clone().requires_grad_() for t in (gate, up)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            g, u = (t.to(torch.bfloat16) if autocast else t for t in inputs)  # autocast's linears give bf16
            out = projection(g, u) if fused else F.linear(F.silu(g) * u, projection.weight)
        out.float().pow(2).sum().backward()
        results.append([out, inputs[0].grad, inputs[1].grad, projection.weight.grad])
    for plain, fused in zip(*results, strict=True):
        assert plain.dtype == fused.dtype and torch.equal(plain, fused)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        projection(gate, up)
    assert [t.shape for t in saved] == [gate.shape, up.shape, projection.weight.shape]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_autograd_and_keeps_only_its_input_and_rsqrt(dtype):
    """The norm with its normalised tensor recomputed in backward: pico's output bit for bit and autograd's
    gradients (fp32 to 1e-6; bf16, where megapico forms them in fp32, to bf16 rounding), saving only x and the
    per-token rsqrt."""
    from reference_pico import RMSNorm as ReferenceRMSNorm

    from megapico.model.pico_decoder import RMSNorm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64).to(dtype)
    grad = torch.randn(2, 5, 64).to(dtype)
    results = []
    for norm in (ReferenceRMSNorm(64, 1e-6), RMSNorm(64, 1e-6)):
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
        norm.to(dtype)
        inputs = x.clone().requires_grad_()
        out = norm(inputs)
        out.backward(grad)
        results.append([out, inputs.grad, norm.weight.grad])
    (reference_out, *reference_grads), (out, *grads) = results
    assert out.dtype == dtype and torch.equal(out, reference_out)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    for expected, actual in zip(reference_grads, grads, strict=True):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        RMSNorm(64, 1e-6).to(dtype)(x)
    assert [(t.shape, t.dtype) for t in saved] == [(x.shape, dtype), ((64,), dtype), ((2, 5, 1), torch.float32)]


@pytest.mark.parametrize("autocast", [False, True])
def test_column_parallel_projections_share_one_cast_of_their_input(autocast):
    """q/k/v (and w_0/w_1) through column_parallel_linears equal autocast's own linears bit for bit, outputs and
    gradients, while keeping one copy of their input in the matmul dtype rather than one per projection."""
    from megapico.parallel import ColumnParallelLinear, column_parallel_linears

    torch.manual_seed(0)
    layers = [ColumnParallelLinear(16, 8, copy_input=False) for _ in range(3)]
    x = torch.randn(2, 5, 16)
    upstream = [torch.randn(2, 5, 8) for _ in layers]
    results = []
    for shared in (False, True):
        inputs = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=saved: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hidden = inputs * 1.0  # not a leaf, as in the model: autocast caches the casts of leaves only
                outputs = (column_parallel_linears(hidden, None, False, *layers) if shared
                           else [layer(hidden) for layer in layers])
        sum((out.float() * grad).sum() for out, grad in zip(outputs, upstream, strict=True)).backward()
        copies = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
        results.append(dict(outputs=outputs, grad=inputs.grad, copies=len(copies),
                            weight_grads=[layer.weight.grad.clone() for layer in layers]))
        for layer in layers:
            layer.weight.grad = None
    plain, shared = results
    assert all(torch.equal(a, b) for a, b in zip(plain["outputs"], shared["outputs"], strict=True))
    assert torch.equal(plain["grad"], shared["grad"])
    assert all(torch.equal(a, b) for a, b in zip(plain["weight_grads"], shared["weight_grads"], strict=True))
    assert (plain["copies"], shared["copies"]) == ((3, 1) if autocast else (1, 1))
