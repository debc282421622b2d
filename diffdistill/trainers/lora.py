"""LoRA adapters (Hu et al. 2021) on frozen teacher weights, for fake-score critics and students.

A LoRA network is a *shallow* copy of the teacher network — its base weights are the frozen teacher's own
tensors — with peft's adapters injected into the named layers: each wrapped layer computes
``W·x + (alpha / rank)·B·A·x`` with ``B = 0`` at the start, so the network starts as the teacher. Only
the adapters (float32) train; checkpoints leave the shared base weights out
(:func:`~diffdistill.trainers.checkpoint.shared_keys`).

This module also gives what the rest of the toolkit needs about such networks: whether a network has
adapters, their peft config and state dict (what diffusers' ``save_lora_weights`` / ``load_lora_weights``
read), copies that share the frozen weights (EMA copies, targets), and a fused plain network (the
adapters merged into the base weights) for exporting a full pipeline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

#: module-name suffixes LoRA wraps by default (the attention projections, resnet convs and time
#: projections of a diffusers UNet / DiT; DMD2's SDXL LoRA list)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
ADAPTER = "default"


def shared_copy(network: nn.Module) -> nn.Module:
    """A structural copy of ``network`` whose parameters and buffers *are* ``network``'s tensors."""
    memo = {id(t): t for t in network.parameters()}
    memo.update({id(t): t for t in network.buffers()})
    return copy.deepcopy(network, memo)


def trainable_copy(network: nn.Module) -> nn.Module:
    """A float32 deep copy of ``network`` with every weight trainable (a full student or critic)."""
    return copy.deepcopy(network).float().train().requires_grad_(True)


def frozen_sharing_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` except for its frozen parameters (``requires_grad=False``) and, for a LoRA
    network, its buffers (the teacher's, see :func:`add_lora`), which the copy shares: an EMA copy or target
    of a LoRA student costs its adapters only. For a fully trainable network this is a plain deep copy."""
    memo = {id(p): p for p in network.parameters() if not p.requires_grad}
    if has_lora(network):
        memo.update({id(b): b for b in network.buffers()})
    return copy.deepcopy(network, memo)


def add_lora(network: nn.Module, rank: int, alpha: float, targets: list[str], what: str, seed: int) -> nn.Module:
    """A shallow copy of ``network`` (see module docstring) with rank-``rank`` adapters on the layers whose
    names end in one of ``targets``; only the adapters require gradients. The adapters' random ``A``
    matrices are drawn from ``seed`` alone (the global RNG is left as it was), so a run is reproducible
    whatever ran before it. ``what`` names the config section in the error raised when no layer matches."""
    from peft import LoraConfig, inject_adapter_in_model

    net = shared_copy(network)
    names = [n for n, _ in net.named_modules()]
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ConfigError(f"{what}.lora_targets {targets} match no module of {type(network).__name__}; name "
                          "some of its layers")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=found, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        p.requires_grad_("lora_" in name)
    return net.train()


def has_lora(network: nn.Module) -> bool:
    return bool(getattr(network, "peft_config", None))


def lora_config(network: nn.Module) -> dict[str, Any]:
    """The adapter's peft ``LoraConfig`` as a plain dict (what diffusers stores as adapter metadata)."""
    config = network.peft_config[ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    return config


def lora_state_dict(network: nn.Module) -> dict[str, Any]:
    """The adapter weights in peft's key format (``<module>.lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(network, adapter_name=ADAPTER).items()}


def fused_copy(network: nn.Module) -> nn.Module:
    """A plain copy of LoRA ``network`` (no peft layers) whose weights are ``W + (alpha/rank)·B·A``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(network)
    net.requires_grad_(False)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    if hasattr(net, "peft_config"):
        del net.peft_config
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net
