"""The sequential driver: captured inputs, propagation and statistics match a plain forward."""
from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from frugalflow.arch import arch_of, decoder_layers
from frugalflow.calibration import hessian_inverse_upper, input_groups, relative_error, run_sequential


def build_tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512, word_embed_proj_dim=64, dropout=0.1)
    return OPTForCausalLM(config)  # left in train mode on purpose: the driver must switch dropout off


def windows(n=5, length=24, vocab=384, seed=1):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def plain_linear_inputs(model, ids):
    """Inputs of every decoder linear in an ordinary eval forward: {(layer, name): [tokens, in]}."""
    arch, seen, handles = arch_of(model), {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in arch.linears:
            handles.append(layer.get_submodule(name).register_forward_hook(
                lambda _m, inp, _o, key=(i, name): seen.setdefault(key, []).append(
                    inp[0].reshape(-1, inp[0].shape[-1]))))
    model.eval()
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def driver_linear_inputs(model, ids, solve=None, batch_size=2, needs=("H", "x_norm", "x_abs_mean")):
    seen, stats, current = {}, {}, [0]

    def accumulate(name, inp, _out):
        seen.setdefault((current[0], name), []).append(inp.reshape(-1, inp.shape[-1]).clone())

    def record(i, layer, st):
        stats[i] = st
        if solve is not None:
            solve(i, layer)
        current[0] = i + 1
        return {"self_attn.q_proj": {"layer": i}}

    progress = []
    result = run_sequential(model, ids, record, needs=needs, accumulate=accumulate, batch_size=batch_size,
                            on_progress=lambda i, n: progress.append((i, n)))
    return {k: torch.cat(v) for k, v in seen.items()}, stats, result, progress


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_driver_matches_plain_forward(family, tiny_model):
    model = tiny_model if family == "llama" else build_tiny_opt()
    ids = windows()
    expected = plain_linear_inputs(model, ids)
    if family == "opt":
        model.train()
    got, stats, result, progress = driver_linear_inputs(model, ids, batch_size=2)  # 5 windows: batches 2, 2, 1
    assert model.training == (family == "opt")  # mode restored
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    n_layers = len(decoder_layers(model))
    assert progress == [(i, n_layers) for i in range(n_layers)]
    layers_path = arch_of(model).layers
    assert result == {f"{layers_path}.{i}.self_attn.q_proj": {"layer": i} for i in range(n_layers)}
    # standard statistics against the recorded inputs
    for (i, name), X in expected.items():
        st = stats[i][name]
        assert st["n"] == X.shape[0] == ids.numel()
        torch.testing.assert_close(st["H"], 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st["x_norm"], X.norm(dim=0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st["x_abs_mean"], X.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_shared_input_groups_share_stats(tiny_model):
    arch = arch_of(tiny_model)
    assert input_groups(arch) == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                  ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    _, stats, _, _ = driver_linear_inputs(tiny_model, windows(n=2), needs=("H",))
    assert stats[0]["self_attn.q_proj"]["H"] is stats[0]["self_attn.v_proj"]["H"]
    assert stats[0]["self_attn.q_proj"]["H"] is not stats[0]["self_attn.o_proj"]["H"]
    assert "x_norm" not in stats[0]["self_attn.q_proj"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_next_layer_sees_compressed_weights(family, tiny_model):
    """After solve() changes layer 0, layer 1's inputs are those of the modified model."""
    model = tiny_model if family == "llama" else build_tiny_opt().eval()
    arch = arch_of(model)
    ids = windows(n=3)

    def damage(i, layer):
        if i == 0:
            for name in arch.linears:
                W = layer.get_submodule(name).weight.data
                W.mul_((torch.arange(W.numel()).reshape(W.shape) % 3 != 0).to(W.dtype))

    got, _, _, _ = driver_linear_inputs(model, ids, solve=damage)
    expected = plain_linear_inputs(model, ids)  # model now holds the damaged layer 0
    for name in arch.linears:
        torch.testing.assert_close(got[(1, name)], expected[(1, name)], rtol=1e-5, atol=1e-5)


def test_propagate_false_keeps_original_activations(tiny_model):
    ids = windows(n=2)
    expected = plain_linear_inputs(tiny_model, ids)
    seen = {}

    def solve(i, layer, _stats):
        if i == 0:
            layer.mlp.down_proj.weight.data.zero_()
        return {}

    run_sequential(tiny_model, ids, solve, needs=(), propagate=False,
                   accumulate=lambda name, inp, _o: seen.setdefault(name, []).append(inp.reshape(-1, inp.shape[-1])))
    torch.testing.assert_close(torch.cat(seen["self_attn.q_proj"][1:]), expected[(1, "self_attn.q_proj")])


def test_hessian_inverse_and_relative_error():
    torch.manual_seed(0)
    X = torch.randn(200, 6)
    X[:, 2] = 0  # a dead input
    H = 2 / 200 * X.T @ X
    U, dead = hessian_inverse_upper(H, dampening=0.01)
    assert dead.tolist() == [False, False, True, False, False, False]
    Hd = H.clone()
    Hd[2, 2] = 1
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(6)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-5)
    assert torch.allclose(U, U.triu())
    W, W2 = torch.randn(3, 6), torch.randn(3, 6)
    direct = ((X @ (W2 - W).T) ** 2).sum() / ((X @ W.T) ** 2).sum()
    assert relative_error(W, W2, H) == pytest.approx(direct.item(), rel=1e-4)


def test_h_stride_subsamples_tokens(tiny_model):
    ids = windows(n=2)
    X = plain_linear_inputs(tiny_model, ids)[(0, "mlp.down_proj")]
    got = {}
    run_sequential(tiny_model, ids, lambda i, _l, st: got.setdefault(i, st), needs=("H", "x_norm"), batch_size=1,
                   h_stride=3)
    Xs = torch.cat([X[:24][::3], X[24:][::3]])  # every 3rd token of each batch
    torch.testing.assert_close(got[0]["mlp.down_proj"]["H"], 2 / Xs.shape[0] * Xs.T @ Xs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0]["mlp.down_proj"]["x_norm"], X.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_bfloat16_calibration_keeps_float32_statistics_close(tiny_model):
    """`autocast=torch.bfloat16`: the layers run in bf16 and each batch's x^T x is a bf16 product, yet H and
    the next layers' inputs stay float32 and within a few per cent of the float32 driver's."""
    ids = windows(n=4, length=32)
    got = {}
    for dtype in (None, torch.bfloat16):
        stats = got[dtype] = {}
        run_sequential(tiny_model, ids, lambda i, _l, st, stats=stats: stats.setdefault(i, st), needs=("H",),
                       batch_size=2, autocast=dtype)
    for i in (0, 1):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            H32, H16 = got[None][i][name]["H"], got[torch.bfloat16][i][name]["H"]
            assert H16.dtype == torch.float32
            difference = ((H16 - H32).norm() / H32.norm()).item()
            assert 0 < difference < 0.05, (i, name, difference)  # it did run in bf16, and stayed close
