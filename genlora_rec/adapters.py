"""PEFT-like entry points: inject LoRA / GenLoRA adapters into ``nn.Linear`` layers, count,
merge, save and load them.

Typical use::

    model = build_tower(...)                       # trained CTR model
    inject_adapters(model, GenLoRAConfig(r=16, group_size=8), r"tower\\.mlp\\.\\d+")
    ...train: only adapter tensors have requires_grad...
    save_adapter(model, "runs/adapter")            # adapter_config.json + adapter_weights.pt
    fresh = build_tower(...); fresh.load_state_dict(base_state)
    load_adapter(fresh, "runs/adapter")            # inject + weights-only load + sha256 check
    merge_adapters(fresh)                          # serve at the base model's cost

Target selection follows Hugging Face PEFT: a ``str`` is a regular expression matched with
``re.fullmatch`` against each module's qualified name (``named_modules()``), and only the
``nn.Linear`` modules among the matches are adapted (so ``r"mlp\\.\\d+"`` skips BatchNorm/ReLU);
a ``list[str]`` names modules exactly or by dotted suffix (``"0"`` matches ``"mlp.0"``), and
every module it matches must be an ``nn.Linear``. Matching nothing is an error.

Freezing: ``inject_adapters`` sets ``requires_grad=False`` on every parameter of the model
(embeddings, biases, norms, unadapted layers, the adapted layers' base weights) and leaves only
the adapter tensors trainable. Buffers such as BatchNorm running statistics are not parameters:
put those modules in ``eval()`` mode yourself if they must stay fixed.

On disk (``save_adapter``)::

    adapter_config.json   {"format_version", "adapter_type", "config", "target_modules":
                           {name: {"in_features", "out_features", "weight_shape"}},
                           "weights_file", "weights_sha256", "num_adapter_parameters",
                           "config_sha256" (the file's checksum of the rest of itself)}
    adapter_weights.pt    {"<module name>.<adapter tensor name>": Tensor} (adapter tensors only)

Both files are written atomically (weights first, then the config that records their sha256).
``load_adapter`` checks the base model against the recorded shapes (``ValueError`` naming the
module and both shapes), verifies both checksums and loads with ``torch.load(weights_only=True)``
(``ArtifactError`` on a corrupted, truncated or inconsistent file), and only then modifies the
model, so a failed load leaves it untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_json,
    json_digest,
    load_torch,
    read_json,
    seal_json,
    sha256_file,
)
from genlora_rec.genlora import GenLoRAConfig, GenLoRALinear
from genlora_rec.lora import AdapterConfig, AdapterLinear, LoRAConfig, LoRALinear

__all__ = [
    "ADAPTER_TYPES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "adapter_layers",
    "find_target_modules",
    "inject_adapters",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "save_adapter",
    "trainable_parameter_count",
    "unmerge_adapters",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_weights.pt"
FORMAT_VERSION = 2  # 2: config_sha256, adapter_config.json's checksum of itself
CONFIG_DIGEST = "config_sha256"

#: adapter_type -> (config class, layer class)
ADAPTER_TYPES: dict[str, tuple[type[AdapterConfig], type[AdapterLinear]]] = {
    LoRAConfig.adapter_type: (LoRAConfig, LoRALinear),
    GenLoRAConfig.adapter_type: (GenLoRAConfig, GenLoRALinear),
}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter layer in ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def find_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules selected by ``target_modules``.

    str: regex, ``re.fullmatch`` on names, non-Linear matches skipped. list: exact names or
    dotted suffixes; a match that is not ``nn.Linear`` raises ``ValueError``. No match raises
    ``ValueError``.
    """
    names: list[str] = []
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        for name, module in model.named_modules():
            if name and pattern.fullmatch(name) and isinstance(module, nn.Linear):
                names.append(name)
    else:
        keys = list(target_modules)
        if not keys:
            raise ValueError("target_modules is empty")
        for name, module in model.named_modules():
            if name and any(name == k or name.endswith("." + k) for k in keys):
                if not isinstance(module, nn.Linear):
                    raise ValueError(
                        f"target module {name!r} is {type(module).__name__}; "
                        "adapters wrap nn.Linear layers only")
                names.append(name)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules {target_modules!r} matched no nn.Linear module; "
            f"the model's nn.Linear modules are {linear}")
    return names


def _install(model: nn.Module, layers: dict[str, AdapterLinear]) -> None:
    """Swap the built layers into ``model`` and freeze everything but the adapter tensors."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)


def _check_no_adapters(model: nn.Module) -> None:
    existing = list(adapter_layers(model))
    if existing:
        raise ValueError(f"model already has adapters on {existing}; one adapter set per model")


def inject_adapters(model: nn.Module, config: AdapterConfig,
                    target_modules: Sequence[str] | str) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place by adapter layers.

    config: ``LoRAConfig`` or ``GenLoRAConfig``. target_modules: regex (str) or list of names
    (see ``find_target_modules``). Every parameter except the new adapter tensors is frozen.
    Returns ``model``. Adapter tensors are initialised from torch's global RNG.
    """
    if not isinstance(config, tuple(c for c, _ in ADAPTER_TYPES.values())):
        raise TypeError(f"config must be one of {sorted(ADAPTER_TYPES)} configs, got {type(config).__name__}")
    _check_no_adapters(model)
    names = find_target_modules(model, target_modules)
    if "" in names:
        raise ValueError("cannot adapt the root module in place; wrap it in a container first")
    layers = {n: config.make_layer(model.get_submodule(n)) for n in names}
    _install(model, layers)
    return model


def trainable_parameter_count(model: nn.Module) -> dict[str, int]:
    """``{"trainable": scalars with requires_grad, "total": all parameter scalars}``."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}


def merge_adapters(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every (unmerged) adapter's ``dW`` into its base weight; returns ``model``."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to merge")
    for layer in layers.values():
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters`` (subtract each merged adapter's ``dW``); returns ``model``."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to unmerge")
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put its plain ``nn.Linear`` back (``requires_grad`` left False).

    The result has the base model's structure and cost; the adapter cannot be unmerged any more.
    """
    for name, layer in adapter_layers(model).items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_weights.pt`` (adapter tensors only) to
    ``directory``; returns the config dict written. Merged or not, the adapter tensors are the same.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save")
    first = next(iter(layers.values())).config
    if any(layer.config != first for layer in layers.values()):
        raise ValueError("save_adapter expects all adapter layers to share one config")
    state: dict[str, torch.Tensor] = {}
    targets: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        for pname, p in layer.adapter_parameters().items():
            state[f"{name}.{pname}"] = p.detach().cpu().clone().contiguous()
        targets[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                         "weight_shape": list(layer.base.weight.shape)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE
    atomic_torch_save(weights_path, state)
    meta = {
        "format_version": FORMAT_VERSION,
        "adapter_type": first.adapter_type,
        "config": first.to_dict(),
        "target_modules": targets,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights_path),
        "num_adapter_parameters": sum(t.numel() for t in state.values()),
    }
    meta = seal_json(meta, CONFIG_DIGEST)
    atomic_write_json(directory / CONFIG_FILE, meta)
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` and load its tensors.

    Raises ``ValueError`` when ``model`` is the wrong base (a target module is missing, not an
    ``nn.Linear``, or has another shape: the message names the module and both shapes) or
    already has adapters; ``ArtifactError`` when a file is missing, corrupted (checksum),
    not weights-only loadable, or inconsistent with its config. ``model`` is only modified once
    every check has passed. Returns ``model``.
    """
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE)
    try:
        version = meta["format_version"]
        adapter_type = meta["adapter_type"]
        cfg_dict = meta["config"]
        targets = meta["target_modules"]
        weights_name = meta["weights_file"]
        sha = meta["weights_sha256"]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{directory / CONFIG_FILE}: missing field {e}") from None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{directory / CONFIG_FILE}: unsupported format_version {version!r} "
                            f"(this version reads {FORMAT_VERSION})")
    if meta.get(CONFIG_DIGEST) != json_digest(meta, CONFIG_DIGEST):
        raise ArtifactError(f"{directory / CONFIG_FILE}: checksum mismatch ({CONFIG_DIGEST}); "
                            "the file was edited or is corrupted")
    if adapter_type not in ADAPTER_TYPES:
        raise ArtifactError(f"{directory / CONFIG_FILE}: unknown adapter_type {adapter_type!r}; "
                            f"known: {sorted(ADAPTER_TYPES)}")
    if weights_name != Path(weights_name).name:
        raise ArtifactError(f"{directory / CONFIG_FILE}: weights_file {weights_name!r} is not a plain file name")
    config_cls, _ = ADAPTER_TYPES[adapter_type]
    try:
        config = config_cls.from_dict(cfg_dict)
        shapes = {name: (int(info["out_features"]), int(info["in_features"]))
                  for name, info in targets.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{directory / CONFIG_FILE}: invalid adapter config ({e})") from None

    _check_no_adapters(model)
    modules = dict(model.named_modules())
    bases: dict[str, nn.Linear] = {}
    for name, expected in shapes.items():
        if name not in modules:
            raise ValueError(f"wrong base model: adapter targets module {name!r} (weight shape "
                             f"{expected}), which the model does not have")
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"wrong base model: module {name!r} is {type(module).__name__}, "
                             f"the adapter expects nn.Linear with weight shape {expected}")
        found = tuple(module.weight.shape)
        if found != expected:
            raise ValueError(f"wrong base model: module {name!r} has weight shape {found}, "
                             f"the adapter expects {expected}")
        bases[name] = module

    weights_path = directory / weights_name
    state = load_torch(weights_path, expected_sha256=sha)
    layers = {name: config.make_layer(base) for name, base in bases.items()}
    expected_keys = {f"{n}.{p}" for n, layer in layers.items() for p in layer.adapter_parameters()}
    if set(state) != expected_keys:
        missing = sorted(expected_keys - set(state))
        extra = sorted(set(state) - expected_keys)
        raise ArtifactError(f"{weights_path}: tensors do not match {CONFIG_FILE} "
                            f"(missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, layer in layers.items():
            for pname, p in layer.adapter_parameters().items():
                t = state[f"{name}.{pname}"]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ArtifactError(f"{weights_path}: tensor {name}.{pname} has shape {shape}, "
                                        f"expected {tuple(p.shape)}")
                p.copy_(t)
    _install(model, layers)
    return model
