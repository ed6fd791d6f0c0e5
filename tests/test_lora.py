"""LoRALinear: zero init, delta weight, merge/unmerge, gradients, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genlora_rec.effective_rank import lora_parameter_count
from genlora_rec.lora import LoRAConfig, LoRALinear


def _layer(d_in: int = 12, d_out: int = 7, **cfg) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    return LoRALinear(base, LoRAConfig(**{"r": 4, "alpha": 8.0, **cfg}))


def _randomise_b(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)


def test_zero_init_leaves_output_unchanged() -> None:
    layer = _layer()
    x = torch.randn(5, 12)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_delta_weight_is_scaled_product(init: str) -> None:
    layer = _layer(init=init)
    _randomise_b(layer)
    dw = layer.delta_weight()
    assert dw.shape == (7, 12)
    torch.testing.assert_close(dw, 2.0 * layer.lora_B @ layer.lora_A)
    x = torch.randn(3, 5, 12)  # arbitrary leading dims
    torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-6, rtol=0)


def test_merge_unmerge_round_trip() -> None:
    layer = _layer()
    _randomise_b(layer)
    x = torch.randn(9, 12)
    w0 = layer.base.weight.clone()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-6, rtol=0)
    assert torch.equal(layer(x), layer.base(x))  # merged forward is the base layer only
    layer.unmerge()
    assert not layer.merged
    assert (layer.base.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-6, rtol=0)


def test_double_merge_warns_and_is_noop() -> None:
    layer = _layer()
    _randomise_b(layer)
    layer.merge()
    w = layer.base.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base.weight, w)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_only_adapter_gets_gradients_and_b_moves_off_zero() -> None:
    layer = _layer()
    x = torch.randn(16, 12)
    layer(x).pow(2).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad is not None  # zero at init because B = 0, as in LoRA


def test_parameter_count_and_dropout() -> None:
    layer = _layer(dropout=0.5)
    assert layer.num_adapter_parameters() == lora_parameter_count(12, 7, 4) == 4 * (12 + 7)
    _randomise_b(layer)
    x = torch.randn(4, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(y1, layer(x))


def test_config_validation_and_round_trip() -> None:
    cfg = LoRAConfig(r=3, alpha=6, dropout=0.1, init="gaussian")
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"r": 0}, {"dropout": 1.0}, {"init": "xavier"}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        LoRAConfig.from_dict({"r": 2, "rank": 2})
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(2, 2, 1), cfg)  # type: ignore[arg-type]
