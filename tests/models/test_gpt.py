"""The GPT language model against independent computations: parameter counts from a formula,
a naive float64 forward pass, causality, weight tying, initialisation, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from localsgd.models.gpt import (
    GPT,
    GPT_SIZES,
    count_parameters,
    gpt_from_size,
    optimizer_groups,
)

torch.set_num_threads(2)


def _formula(vocab: int, context: int, width: int, depth: int, *, mlp_ratio: int = 4,
             bias: bool = False, learned: bool = False, tied: bool = True) -> int:
    """Parameters of a GPT-2 layout model, counted from its matrices."""
    d, h = width, mlp_ratio * width
    attn = d * 3 * d + d * d + (3 * d + d if bias else 0)
    mlp = d * h + h * d + (h + d if bias else 0)
    norm = 2 * d if bias else d
    emb = vocab * d + (context * d if learned else 0)
    head = 0 if tied else vocab * d
    return emb + depth * (attn + mlp + 2 * norm) + norm + head


@pytest.mark.parametrize("size", sorted(GPT_SIZES))
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_named_size_parameter_counts(size: str, positions: str) -> None:
    shape = GPT_SIZES[size]
    with torch.device("meta"):  # counts only; no memory or init time for the 124 M model
        model = gpt_from_size(size, 256, 128, positions=positions)
    expected = _formula(256, 128, shape.width, shape.depth, learned=positions == "learned")
    assert count_parameters(model) == expected


def test_size_ranges_and_gpt2_small() -> None:
    counts = {}
    for size in GPT_SIZES:
        with torch.device("meta"):
            counts[size] = count_parameters(gpt_from_size(size, 256, 128))
    assert 0.7e6 < counts["gpt_tiny"] < 1.3e6
    assert 5e6 < counts["gpt_mini"] < 11e6
    assert GPT_SIZES["gpt2_124m"] == type(GPT_SIZES["gpt2_124m"])(768, 12, 12)
    with torch.device("meta"):
        gpt2 = gpt_from_size("gpt2_124m", 50257, 1024, positions="learned", bias=True)
    # Published size of GPT-2 small (tied embeddings, learned positions, biases).
    assert count_parameters(gpt2) == 124_439_808


def test_untied_head_is_a_second_tensor() -> None:
    model = GPT(64, 16, 32, 2, 2, tie_embeddings=False)
    assert model.head.weight is not model.tok_emb.weight
    assert count_parameters(model) == _formula(64, 16, 32, 2, tied=False)


def test_tied_weights_are_one_tensor() -> None:
    torch.manual_seed(0)
    model = GPT(64, 16, 32, 2, 2)
    assert model.head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "head.weight" in names and "tok_emb.weight" in names
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == _formula(64, 16, 32, 2)
    # A step on the shared tensor moves input and output embedding together.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randint(0, 64, (2, 16))).flatten(0, 1),
                    torch.randint(0, 64, (32,))).backward()
    opt.step()
    assert torch.equal(model.head.weight, model.tok_emb.weight)


def test_optimizer_groups_split_matrices_from_vectors() -> None:
    model = GPT(64, 16, 32, 2, 2, positions="learned", bias=True)
    decay, no_decay = optimizer_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, _ in model.named_parameters() if n.endswith(".bias") or ".ln" in n
        or n.startswith("ln_f")}
    torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-3)  # accepted as is


def test_state_dict_holds_parameters_only_and_loads_into_a_copy() -> None:
    torch.manual_seed(0)
    model = GPT(64, 16, 32, 2, 2)
    assert list(model.buffers()) == []
    torch.manual_seed(1)
    other = GPT(64, 16, 32, 2, 2)
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    assert other.head.weight is other.tok_emb.weight
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx), other(idx))


def test_init_statistics() -> None:
    torch.manual_seed(0)
    depth = 4
    model = GPT(256, 128, 128, depth, 4)
    residual = 0.02 / math.sqrt(2 * depth)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        else:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name


def _naive_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's function written out with explicit masks, softmax and complex rotations."""
    w = dict(model.named_parameters(remove_duplicate=False))
    t = idx.shape[1]
    x = w["tok_emb.weight"][idx]
    if model.positions == "learned":
        x = x + w["pos_emb.weight"][:t]

    def norm(z: torch.Tensor, prefix: str) -> torch.Tensor:
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        out = (z - mu) / torch.sqrt(var + 1e-5) * w[prefix + ".weight"]
        return out + w[prefix + ".bias"] if prefix + ".bias" in w else out

    def rotate(z: torch.Tensor) -> torch.Tensor:  # pairs (i, i + hd/2) as complex numbers
        hd = z.shape[-1]
        c = torch.complex(z[..., : hd // 2], z[..., hd // 2 :])
        freq = torch.tensor([10000.0 ** (-2 * i / hd) for i in range(hd // 2)],
                            dtype=torch.float64)
        pos = torch.arange(t, dtype=torch.float64)[:, None]
        c = c * torch.exp(1j * pos * freq)
        return torch.cat((c.real, c.imag), dim=-1)

    heads = len(model.blocks) and model.blocks[0].attn.heads
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        h = norm(x, p + "ln1")
        q, k, v = (h @ w[p + "attn.qkv.weight"].T).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
        if model.positions == "rope":
            q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        att = e / e.sum(-1, keepdim=True)
        y = (att @ v).transpose(1, 2).flatten(2)
        x = x + y @ w[p + "attn.proj.weight"].T
        h = norm(x, p + "ln2") @ w[p + "mlp.fc.weight"].T
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ w[p + "mlp.proj.weight"].T
    return norm(x, "ln_f") @ w["tok_emb.weight"].T


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_equals_naive_attention_in_float64(positions: str) -> None:
    torch.manual_seed(0)
    model = GPT(50, 12, 24, 2, 3, positions=positions).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights so attention is far from uniform
            p.mul_(8)
    idx = torch.randint(0, 50, (3, 10))  # shorter than the context
    with torch.no_grad():
        ours, naive = model(idx), _naive_forward(model, idx)
    assert ours.dtype == torch.float64
    assert naive.std() > 1.0
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_causal(positions: str) -> None:
    torch.manual_seed(0)
    model = GPT(64, 32, 32, 2, 4, positions=positions).eval()
    idx = torch.randint(0, 64, (2, 32))
    t = 17
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = GPT(64, 16, 32, 2, 2, positions="learned", bias=True, dropout=0.1)
    idx = torch.randint(0, 64, (4, 16))
    F.cross_entropy(model(idx).flatten(0, 1), torch.randint(0, 64, (64,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_memorises_a_repeated_sequence(positions: str) -> None:
    torch.manual_seed(0)
    vocab, context = 16, 32
    # Random tokens from a small vocabulary: the next token depends on position, not just on
    # the current token, so the model has to use the positional signal.
    seq = torch.randint(0, vocab, (context + 1,))
    x, y = seq[:-1][None], seq[1:][None]
    model = GPT(vocab, context, 32, 2, 2, positions=positions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(120):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.05


def test_bf16_autocast_close_to_float32() -> None:
    torch.manual_seed(0)
    model = GPT(64, 32, 64, 2, 4).eval()
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        ref = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_bad_shapes_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        GPT(0, 16, 30, 2, 4, positions="alibi", dropout=1.5)
    msg = str(err.value)
    for part in ("vocab_size", "positions", "not divisible", "dropout"):
        assert part in msg
    with pytest.raises(ValueError, match="even head size"):
        GPT(64, 16, 30, 2, 2)
    with pytest.raises(ValueError, match="exceeds the model context 8"):
        GPT(64, 8, 32, 1, 2)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown GPT size"):
        gpt_from_size("gpt_huge", 256, 128)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model = GPT(64, 32, 64, 2, 4)
    compiled = torch.compile(model)
    idx = torch.randint(0, 64, (2, 32))
    eager = model(idx)
    out = compiled(idx)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())



def test_channels_last_and_float64_are_harmless() -> None:
    torch.manual_seed(0)
    model = GPT(64, 16, 32, 2, 2)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model(idx)
        # build_model lays 4-D weights out channels_last; a GPT has none, so nothing changes.
        assert torch.equal(model.to(memory_format=torch.channels_last)(idx), ref)
    double = copy.deepcopy(model).double()
    out = double(idx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in double.parameters())
