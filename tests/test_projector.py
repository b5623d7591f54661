"""Projectors: official state_dict layout, shapes, and numerics against a functional re-derivation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.projector import build_projector

LDP_KEYS = {
    "model.mlp.1.weight", "model.mlp.1.bias", "model.mlp.3.weight", "model.mlp.3.bias",
    *(
        f"model.mb_block.{b}.block.{suffix}"
        for b in (1, 2)
        for suffix in (
            "0.0.weight", "0.1.weight", "0.1.bias",
            "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias",
            "2.0.weight", "2.1.weight", "2.1.bias",
        )
    ),
}  # fmt: skip
LDPV2_KEYS = {
    "mlp.mlp.0.weight",
    "mlp.mlp.0.bias",
    "mlp.mlp.2.weight",
    "mlp.mlp.2.bias",
    "peg.peg.0.weight",
    "peg.peg.0.bias",
}
MLP_KEYS = {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("kind", "keys"), [("ldpnet", LDP_KEYS), ("ldpnetv2", LDPV2_KEYS), ("mlp2x_gelu", MLP_KEYS)]
)
def test_state_dict_layout_is_the_official_one(kind: str, keys: set[str]) -> None:
    assert set(build_projector(kind, 32, 64).state_dict()) == keys


@pytest.mark.parametrize(
    ("kind", "grid", "out"), [("ldpnet", 4, 2), ("ldpnet", 5, 3), ("ldpnetv2", 4, 2), ("mlp2x_gelu", 4, 4)]
)
def test_token_counts(kind: str, grid: int, out: int) -> None:
    proj = build_projector(kind, 16, 24)
    y = proj(torch.randn(2, grid * grid, 16))
    assert y.shape == (2, out * out, 24)


def test_non_square_grid_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="square patch grid, got 15 tokens"):
        build_projector("ldpnet", 8, 8)(torch.randn(1, 15, 8))


def test_unknown_projector_type() -> None:
    with pytest.raises(ValueError, match="ldpnet, ldpnetv2, mlp2x_gelu"):
        build_projector("resampler", 8, 8)


def _ln2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-5).permute(0, 3, 1, 2)


def _ir(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, stride: int) -> torch.Tensor:
    c = x.shape[1]
    y = F.conv2d(x, sd[f"{p}.0.0.weight"], stride=stride, padding=1, groups=c)
    y = F.hardswish(_ln2d(y, sd[f"{p}.0.1.weight"], sd[f"{p}.0.1.bias"]))
    s = y.mean(dim=(2, 3), keepdim=True)
    s = F.relu(F.conv2d(s, sd[f"{p}.1.fc1.weight"], sd[f"{p}.1.fc1.bias"]))
    y = y * F.hardsigmoid(F.conv2d(s, sd[f"{p}.1.fc2.weight"], sd[f"{p}.1.fc2.bias"]))
    y = _ln2d(F.conv2d(y, sd[f"{p}.2.0.weight"]), sd[f"{p}.2.1.weight"], sd[f"{p}.2.1.bias"])
    return y + x if stride == 1 else y


def test_ldp_matches_a_functional_rederivation() -> None:
    torch.manual_seed(0)
    proj = build_projector("ldpnet", 16, 32)
    for p in proj.parameters():  # LayerNorm starts at identity; randomise to exercise every weight
        torch.nn.init.normal_(p, std=0.3)
    sd = proj.state_dict()
    x = torch.randn(2, 36, 16)
    h = F.linear(
        F.gelu(F.linear(x, sd["model.mlp.1.weight"], sd["model.mlp.1.bias"])),
        sd["model.mlp.3.weight"],
        sd["model.mlp.3.bias"],
    )
    g = h.transpose(1, 2).reshape(2, 32, 6, 6)
    g = _ir(_ir(g, sd, "model.mb_block.1.block", 1), sd, "model.mb_block.2.block", 2)
    expected = g.flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-5)


def test_ldpv2_matches_a_functional_rederivation() -> None:
    torch.manual_seed(0)
    proj = build_projector("ldpnetv2", 16, 32)
    sd = proj.state_dict()
    x = torch.randn(2, 64, 16)
    h = F.linear(
        F.gelu(F.linear(x, sd["mlp.mlp.0.weight"], sd["mlp.mlp.0.bias"])),
        sd["mlp.mlp.2.weight"],
        sd["mlp.mlp.2.bias"],
    )
    g = F.avg_pool2d(h.transpose(1, 2).reshape(2, 32, 8, 8), 2)
    g = F.conv2d(g, sd["peg.peg.0.weight"], sd["peg.peg.0.bias"], padding=1, groups=32) + g
    torch.testing.assert_close(proj(x), g.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
