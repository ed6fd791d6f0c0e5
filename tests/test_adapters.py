"""inject / count / merge / save / load of adapters on a small embedding + MLP model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from data.artifacts import ArtifactError, read_json, sha256_file
from genlora_rec.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_layers,
    find_target_modules,
    inject_adapters,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    trainable_parameter_count,
    unmerge_adapters,
)
from genlora_rec.genlora import GenLoRAConfig, GenLoRALinear
from genlora_rec.lora import AdapterConfig, LoRAConfig, LoRALinear

CONFIGS = [LoRAConfig(r=4, alpha=8.0), GenLoRAConfig(r=6, alpha=6.0, group_size=4),
           GenLoRAConfig(r=6, alpha=6.0, group_size=4, num_rbfs=3)]
IDS = ["lora", "genlora", "genlora-shared"]
PATTERN = r"mlp\.\d+"


class Toy(nn.Module):
    """Embeddings [B, 2] -> [B, 2, 4] -> flatten -> MLP -> logit [B]."""

    def __init__(self, hidden: tuple[int, int] = (16, 12)) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        h1, h2 = hidden
        self.mlp = nn.Sequential(nn.Linear(8, h1), nn.BatchNorm1d(h1), nn.ReLU(),
                                 nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids).flatten(1)).squeeze(-1)


def _model(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 10, (32, 2), generator=torch.Generator().manual_seed(5))


def _perturb(model: nn.Module) -> None:
    """Make every adapter tensor non-trivial (as after training)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.3 * torch.randn_like(p))


def test_regex_targets_only_linear_layers() -> None:
    model = _model()
    assert find_target_modules(model, PATTERN) == ["mlp.0", "mlp.3", "mlp.5"]
    inject_adapters(model, LoRAConfig(r=2), PATTERN)
    assert list(adapter_layers(model)) == ["mlp.0", "mlp.3", "mlp.5"]
    assert isinstance(model.mlp[1], nn.BatchNorm1d)
    assert isinstance(model.mlp[0], LoRALinear)


def test_list_targets_exact_and_suffix() -> None:
    model = _model()
    inject_adapters(model, GenLoRAConfig(r=2, group_size=4), ["mlp.0", "3"])
    assert list(adapter_layers(model)) == ["mlp.0", "mlp.3"]
    assert isinstance(model.mlp[3], GenLoRALinear) and isinstance(model.mlp[5], nn.Linear)


def test_bad_targets_raise() -> None:
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_adapters(_model(), LoRAConfig(), r"tower\.\d+")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        inject_adapters(_model(), LoRAConfig(), ["mlp.1"])
    model = inject_adapters(_model(), LoRAConfig(), PATTERN)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, LoRAConfig(), PATTERN)
    with pytest.raises(TypeError):
        inject_adapters(_model(), {"r": 2}, PATTERN)  # type: ignore[arg-type]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_zero_init_and_only_adapters_get_gradients(config: AdapterConfig) -> None:
    model, ids = _model(), _ids()
    y0 = model(ids)
    inject_adapters(model, config, PATTERN)
    assert torch.equal(model(ids), y0)  # dW = 0 at injection
    model.train()
    model(ids).pow(2).sum().backward()
    adapter_ids = {id(p) for layer in adapter_layers(model).values()
                   for p in layer.adapter_parameters().values()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert model.emb.weight.grad is None and model.mlp[1].weight.grad is None
    counts = trainable_parameter_count(model)
    n_adapter = sum(layer.num_adapter_parameters() for layer in adapter_layers(model).values())
    n_base = sum(p.numel() for p in _model().parameters())
    assert counts == {"trainable": n_adapter, "total": n_base + n_adapter}


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_merge_unmerge_model(config: AdapterConfig) -> None:
    model, ids = inject_adapters(_model(), config, PATTERN), _ids()
    _perturb(model)
    y = model(ids)
    weights = {n: m.base.weight.clone() for n, m in adapter_layers(model).items()}
    merge_adapters(model)
    assert all(m.merged for m in adapter_layers(model).values())
    torch.testing.assert_close(model(ids), y, atol=1e-6, rtol=0)
    unmerge_adapters(model)
    for n, m in adapter_layers(model).items():
        assert (m.base.weight - weights[n]).abs().max() <= 1e-6
    torch.testing.assert_close(model(ids), y, atol=1e-6, rtol=0)
    merge_and_unload(model)
    assert not adapter_layers(model) and type(model.mlp[0]) is nn.Linear
    torch.testing.assert_close(model(ids), y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_save_load_round_trip_is_exact(config: AdapterConfig, tmp_path: Path) -> None:
    model, ids = inject_adapters(_model(), config, PATTERN), _ids()
    _perturb(model)
    y = model(ids)
    meta = save_adapter(model, tmp_path)
    on_disk = read_json(tmp_path / CONFIG_FILE)
    assert on_disk == meta
    assert on_disk["adapter_type"] == config.adapter_type
    assert on_disk["config"] == config.to_dict()
    assert on_disk["target_modules"]["mlp.3"] == {"in_features": 16, "out_features": 12,
                                                  "weight_shape": [12, 16]}
    assert on_disk["weights_sha256"] == sha256_file(tmp_path / WEIGHTS_FILE)
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert all(".base." not in k and not k.startswith("emb") for k in state)  # adapter tensors only
    assert sum(t.numel() for t in state.values()) == trainable_parameter_count(model)["trainable"]

    fresh = _model()  # same base weights, different adapter init draws
    torch.manual_seed(123)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(ids), y)
    assert trainable_parameter_count(fresh) == trainable_parameter_count(model)
    # saving while merged stores the same adapter tensors
    merge_adapters(model)
    save_adapter(model, tmp_path / "merged")
    assert torch.load(tmp_path / "merged" / WEIGHTS_FILE, weights_only=True).keys() == state.keys()


def test_load_onto_wrong_base_fails_clearly(tmp_path: Path) -> None:
    model = inject_adapters(_model(), GenLoRAConfig(r=3, group_size=4), PATTERN)
    save_adapter(model, tmp_path)
    wrong = _model(hidden=(16, 10))
    with pytest.raises(ValueError, match=r"'mlp\.3'.*\(10, 16\).*\(12, 16\)"):
        load_adapter(wrong, tmp_path)
    assert not adapter_layers(wrong)  # a failed load leaves the model untouched
    assert all(p.requires_grad for p in wrong.parameters())

    missing = nn.Module()
    missing.mlp = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(ValueError, match=r"'mlp\.3'.*does not have"):
        load_adapter(missing, tmp_path)
    not_linear = _model()
    not_linear.mlp[3] = nn.Identity()
    with pytest.raises(ValueError, match=r"'mlp\.3' is Identity"):
        load_adapter(not_linear, tmp_path)


def test_corrupted_or_inconsistent_files_raise_artifact_error(tmp_path: Path) -> None:
    model = inject_adapters(_model(), LoRAConfig(r=2), PATTERN)
    _perturb(model)
    save_adapter(model, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    good = weights.read_bytes()

    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF
    weights.write_bytes(bytes(corrupted))
    fresh = _model()
    with pytest.raises(ArtifactError, match="checksum"):
        load_adapter(fresh, tmp_path)
    assert not adapter_layers(fresh)

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ArtifactError):
        load_adapter(_model(), tmp_path)
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_adapter(_model(), tmp_path)

    weights.write_bytes(good)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ArtifactError):
        load_adapter(_model(), tmp_path)


def test_weights_inconsistent_with_config_raise_artifact_error(tmp_path: Path) -> None:
    from data.artifacts import atomic_write_json, seal_json

    model = inject_adapters(_model(), LoRAConfig(r=2), PATTERN)
    meta = save_adapter(model, tmp_path)
    meta["config"]["r"] = 3  # config now disagrees with the stored tensors
    atomic_write_json(tmp_path / CONFIG_FILE, meta)
    with pytest.raises(ArtifactError, match="checksum mismatch"):  # an edit without resealing
        load_adapter(_model(), tmp_path)
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json(meta, "config_sha256"))
    with pytest.raises(ArtifactError, match="shape"):
        load_adapter(_model(), tmp_path)
    meta["config"]["rank"] = 3
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json(meta, "config_sha256"))
    with pytest.raises(ArtifactError, match="unknown config field"):
        load_adapter(_model(), tmp_path)
    meta["adapter_type"] = "ia3"
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json(meta, "config_sha256"))
    with pytest.raises(ArtifactError, match="unknown adapter_type"):
        load_adapter(_model(), tmp_path)


def test_training_adapter_only_changes_adapter_tensors() -> None:
    model, ids = inject_adapters(_model(), GenLoRAConfig(r=4, group_size=4), PATTERN), _ids()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.rand(32)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(ids), target)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
