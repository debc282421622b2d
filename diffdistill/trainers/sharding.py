"""Sharding the frozen teacher over the processes of a multi-process run (``train.shard_teacher``, or an
``accelerate launch`` with ``distributed_type: FSDP``; see ``configs/accelerate/fsdp.yaml``).

The teacher is the one network every method holds and none trains, so it is the one FSDP can shard with
nothing else changing: torch's ``fully_shard`` (FSDP2) splits each of its blocks' weights across the
processes and all-gathers a block's weights just before that block runs, forward and backward (a
generator loss may differentiate through the teacher with respect to its input). Each process keeps
about ``1/N`` of the teacher's weights. The trained roles (student, critic, GAN head) and the EMA copies
stay whole on every process; their gradients are averaged by the loop's all-reduce, as without sharding.
Sharding changes no number: a block's gathered weights are the teacher's weights, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .checkpoint import shared_keys


def shard_blocks(network: nn.Module) -> list[nn.Module]:
    """The units each sharded on its own: the items of the outermost ``nn.ModuleList`` s (a UNet's down,
    up and resnet blocks, a transformer's layers) that hold weights; the rest stays with the root."""
    blocks, taken = [], []
    for name, module in network.named_modules():
        if any(name.startswith(prefix) for prefix in taken) or not isinstance(module, nn.ModuleList):
            continue
        for i, item in enumerate(module):
            if any(True for _ in item.parameters()):
                blocks.append(item)
                taken.append(f"{name}.{i}." if name else f"{i}.")
    return blocks


def shard_frozen_teacher(teacher: nn.Module, trained: dict[str, nn.Module], world: int,
                         device: torch.device) -> tuple[int, int]:
    """Shard ``teacher`` in place over the ``world`` processes (see the module docstring); returns this
    process's and the whole teacher's weight counts. Refused when a trained role shares the teacher's
    tensors (LoRA students and critics are adapters on them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharing = [role for role, module in trained.items() if shared_keys(module, teacher)]
    if sharing:
        raise ConfigError(f"train.shard_teacher: the {', '.join(sharing)} shares the teacher's weights (LoRA "
                          "adapters on them); train it without sharding, or set student.lora_rank=0 and critic.kind=full")
    total = sum(p.numel() for p in teacher.parameters())
    if total == 0:
        raise ConfigError("train.shard_teacher: this teacher has no weights to shard (an analytic teacher)")
    mesh = init_device_mesh(device.type, (world,))
    for block in shard_blocks(teacher):
        fully_shard(block, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    return sum(p.to_local().numel() for p in teacher.parameters()), total
