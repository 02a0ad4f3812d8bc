"""LoRA adapters (osfed_hpc.lora) and local pretrained weights (models.load_pretrained)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from osfed_hpc.lora import (
    LoRAConv2d,
    LoRALinear,
    apply_lora,
    find_head,
    lora_A_matrix,
    lora_B_matrix,
    lora_delta,
    lora_layers,
    lora_slices,
    trainable_parameters,
)
from osfed_hpc.models import build_model, load_pretrained

CLASSES = 10
RANK = 4
ALPHA = 8.0
# model name -> (in_channels, image size); small inputs keep the suite fast on a shared CPU
SHAPES = {"cnn": (1, 28), "mlp": (1, 28), "resnet18_gn": (3, 32), "vit_tiny": (1, 28)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(name: str, seed: int = 0) -> nn.Module:
    channels, size = SHAPES[name]
    net = build_model(name, channels, size, CLASSES, seed=seed)
    if name == "vit_tiny":  # torchvision zero-inits the head: make the output depend on the body
        with torch.no_grad():
            nn.init.normal_(net.heads.head.weight, generator=_gen(99))
    return net.eval()


def _input(name: str, batch: int = 3) -> torch.Tensor:
    channels, size = SHAPES[name]
    return torch.randn(batch, channels, size, size, generator=_gen(123))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_adapted_model_equals_base_at_init(name):
    net = _model(name)
    x = _input(name)
    with torch.no_grad():
        before = net(x)
        apply_lora(net, RANK, ALPHA, _gen(), CLASSES)
        after = net(x)
    assert lora_layers(net), "nothing was wrapped"
    assert after.abs().max() > 0
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_only_lora_factors_and_head_are_trainable(name):
    net = apply_lora(_model(name), RANK, ALPHA, _gen(), CLASSES)
    head = find_head(net, CLASSES)
    expected = {id(p) for _, m in lora_layers(net) for p in (m.lora_A, m.lora_B)}
    expected |= {id(p) for p in head.parameters()}
    assert {id(p) for _, p in trainable_parameters(net)} == expected
    assert head.weight.requires_grad and head.bias.requires_grad
    for _, layer in lora_layers(net):
        assert not any(p.requires_grad for p in layer.base.parameters())
        assert not torch.count_nonzero(layer.lora_B)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(net))


@pytest.mark.parametrize("rank", [1, 4])
def test_mlp_trainable_count_matches_formula(rank):
    # 784-200-200-10: Linear(in, out) gets r*(in + out); the head keeps 200*10 + 10
    net = apply_lora(_model("mlp"), rank, ALPHA, _gen(), CLASSES)
    assert _count(net) == rank * ((784 + 200) + (200 + 200)) + (200 * 10 + 10)


@pytest.mark.parametrize("rank", [1, 4])
def test_cnn_trainable_count_matches_formula(rank):
    # conv(1->16,3): r*(1*9 + 16); conv(16->32,3): r*(16*9 + 32); fc(32*12*12 -> 64): r*(4608 + 64)
    net = apply_lora(_model("cnn"), rank, ALPHA, _gen(), CLASSES)
    assert _count(net) == rank * ((9 + 16) + (144 + 32) + (4608 + 64)) + (64 * 10 + 10)
    assert [type(m) for _, m in lora_layers(net)] == [LoRAConv2d, LoRAConv2d, LoRALinear]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_training_changes_only_trainable_tensors(name):
    net = apply_lora(_model(name), RANK, ALPHA, _gen(), CLASSES).train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD([p for _, p in trainable_parameters(net)], lr=0.1)
    x, y = _input(name, batch=8), torch.arange(8) % CLASSES
    for _ in range(2):  # A gets no gradient while B == 0, so one step would leave it unchanged
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for n, p in net.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad, n
        assert (p.grad is not None) == p.requires_grad, n


def _factors(net: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for _, m in lora_layers(net) for t in (m.lora_A, m.lora_B)]


def test_init_is_deterministic_given_generator_seed():
    a = _factors(apply_lora(_model("cnn"), RANK, ALPHA, _gen(5), CLASSES))
    b = _factors(apply_lora(_model("cnn"), RANK, ALPHA, _gen(5), CLASSES))
    c = _factors(apply_lora(_model("cnn"), RANK, ALPHA, _gen(6), CLASSES))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_init_ignores_global_rng_and_follows_kaiming_bound():
    torch.manual_seed(1)
    a = _factors(apply_lora(_model("mlp"), RANK, ALPHA, _gen(5), CLASSES))
    torch.manual_seed(2)
    b = _factors(apply_lora(_model("mlp"), RANK, ALPHA, _gen(5), CLASSES))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    net = apply_lora(_model("mlp"), RANK, ALPHA, _gen(5), CLASSES)
    for _, m in lora_layers(net):
        assert m.lora_A.abs().max() <= m.lora_A.shape[1] ** -0.5


def test_multihead_attention_children_are_not_wrapped():
    net = apply_lora(_model("vit_tiny"), RANK, ALPHA, _gen(), CLASSES)
    attentions = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 4
    for mha in attentions:
        assert type(mha.out_proj) is not LoRALinear and not isinstance(mha.out_proj, LoRALinear)
        assert not any(p.requires_grad for p in mha.parameters())
    names = [n for n, _ in lora_layers(net)]
    assert "conv_proj" in names
    assert sum(n.endswith("mlp.0") or n.endswith("mlp.3") for n in names) == 8
    assert not any("self_attention" in n for n in names)
    assert isinstance(net.heads.head, nn.Linear) and net.heads.head.weight.requires_grad


def test_delta_matrices_reproduce_the_adapter_output():
    """B(A(x)) must equal a conv with kernel B@A: the server-side correction relies on it."""
    net = apply_lora(_model("cnn"), RANK, ALPHA, _gen(), CLASSES)
    for _, m in lora_layers(net):
        nn.init.normal_(m.lora_B, generator=_gen(7))
    x = _input("cnn")
    conv = net.features[0]
    assert isinstance(conv, LoRAConv2d)
    a, b = lora_A_matrix(conv), lora_B_matrix(conv)
    assert a.shape == (RANK, 1 * 3 * 3) and b.shape == (16, RANK)
    delta = lora_delta(conv)
    torch.testing.assert_close(delta, (ALPHA / RANK) * b @ a)
    merged = nn.functional.conv2d(x, conv.base.weight + delta.view_as(conv.base.weight), conv.base.bias)
    torch.testing.assert_close(conv(x), merged, rtol=1e-5, atol=1e-5)
    fc = net.classifier[1]
    h = torch.randn(2, fc.base.in_features, generator=_gen(8))
    torch.testing.assert_close(fc(h), nn.functional.linear(h, fc.base.weight + lora_delta(fc), fc.base.bias))


def test_slices_locate_factors_in_flat_trainable_vector():
    net = apply_lora(_model("cnn"), RANK, ALPHA, _gen(), CLASSES)
    vec = torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(net)])
    slices = lora_slices(net)
    assert [s.name for s in slices] == [n for n, _ in lora_layers(net)]
    for s in slices:
        assert torch.equal(vec[s.a].view(s.layer.lora_A.shape), s.layer.lora_A)
        assert torch.equal(vec[s.b].view(s.layer.lora_B.shape), s.layer.lora_B)
        torch.testing.assert_close(lora_delta(s.layer, vec[s.a], vec[s.b]), lora_delta(s.layer))


def test_grouped_conv_stays_frozen_without_adapter():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))
    apply_lora(net, RANK, ALPHA, _gen(), CLASSES)
    assert type(net[0]) is nn.Conv2d and not net[0].weight.requires_grad
    assert lora_layers(net) == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_model("mlp"), 0, ALPHA, _gen(), CLASSES)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_model("mlp"), RANK, 0.0, _gen(), CLASSES)
    with pytest.raises(ValueError, match="out_features=7"):
        apply_lora(_model("mlp"), RANK, ALPHA, _gen(), 7)


def test_vit_tiny_refuses_sizes_without_a_4x4_patch_grid():
    with pytest.raises(ValueError, match="model.name=vit_tiny"):
        build_model("vit_tiny", 1, 30, CLASSES)
    assert build_model("vit_tiny", 3, 8, CLASSES)(torch.zeros(1, 3, 8, 8)).shape == (1, CLASSES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = apply_lora(_model("cnn"), RANK, ALPHA, _gen(3), CLASSES)
    gpu = apply_lora(_model("cnn").cuda(), RANK, ALPHA, _gen(3), CLASSES)
    for x, y in zip(_factors(cpu), _factors(gpu)):
        assert y.is_cuda and torch.equal(x, y.cpu())
    x = _input("cnn")
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


# --- load_pretrained -----------------------------------------------------------------------------


def _prefix(path) -> str:
    return re.escape(f"model.pretrained {str(path)!r}:")


def test_load_pretrained_round_trip(tmp_path):
    source, target = _model("cnn", seed=1), _model("cnn", seed=2)
    path = tmp_path / "cnn.pt"
    torch.save(source.state_dict(), path)
    load_pretrained(target, path)
    for (n, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_pretrained_names_missing_keys(tmp_path):
    state = _model("cnn").state_dict()
    del state["classifier.1.weight"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=_prefix(tmp_path / "m.pt") + ".*missing keys: classifier.1.weight"):
        load_pretrained(_model("cnn"), str(tmp_path / "m.pt"))


def test_load_pretrained_names_shape_mismatch(tmp_path):
    state = _model("cnn").state_dict()
    state["classifier.3.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "m.pt")
    expected = r".*shape mismatch: classifier.3.bias \(file \(3,\), model \(10,\)\)"
    with pytest.raises(ValueError, match=_prefix(tmp_path / "m.pt") + expected):
        load_pretrained(_model("cnn"), tmp_path / "m.pt")


def test_load_pretrained_names_unexpected_keys_and_truncates(tmp_path):
    state = _model("cnn").state_dict()
    state.update({f"extra.{i}": torch.zeros(1) for i in range(8)})
    torch.save(state, tmp_path / "m.pt")
    expected = r".*unexpected keys: extra.0, .*extra.4 \(and 3 more\)"
    with pytest.raises(ValueError, match=_prefix(tmp_path / "m.pt") + expected):
        load_pretrained(_model("cnn"), tmp_path / "m.pt")


def test_load_pretrained_refuses_bad_files(tmp_path):
    net = _model("mlp")
    with pytest.raises(ValueError, match=_prefix(tmp_path / "none.pt") + " no such file"):
        load_pretrained(net, tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=_prefix(tmp_path / "junk.pt") + " cannot be read"):
        load_pretrained(net, tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=_prefix(tmp_path / "list.pt") + " expected a mapping"):
        load_pretrained(net, tmp_path / "list.pt")
    torch.save({"net.1.weight": 3}, tmp_path / "int.pt")
    expected = " not a mapping of names to tensors.*net.1.weight"
    with pytest.raises(ValueError, match=_prefix(tmp_path / "int.pt") + expected):
        load_pretrained(net, tmp_path / "int.pt")


def test_load_pretrained_leaves_model_untouched_on_error(tmp_path):
    net = _model("mlp")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = _model("mlp", seed=5).state_dict()
    del state["net.5.bias"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ValueError):
        load_pretrained(net, tmp_path / "m.pt")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
