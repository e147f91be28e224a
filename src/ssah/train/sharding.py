"""FSDP2 for ssah's training loop (`train.shard: fsdp2`, `--shard fsdp2`).

Under `torchrun` or `accelerate launch` (a plain multi-process config: ssah does the sharding, so
the same path runs on GPUs with NCCL and on CPUs with gloo), every decoder block and then the whole
model are wrapped with `torch.distributed.fsdp.fully_shard`: each process holds dim-0 shards of
every parameter (DTensors), gathered per block for forward and backward. `UnitFreezer` follows the
parameters onto their shards (`UnitFreezer.wrap_optimizer` rebinds it), and the trained model is
gathered into one full state dict on the main process for saving.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ssah.errors import SsahError

try:  # looked up once: the freezer asks for every parameter at every step
    from torch.distributed.tensor import DTensor as _dtensor
except ImportError:  # a torch built without distributed support
    _dtensor = None


def is_main_process() -> bool:
    """False in every process but the first of a `torchrun` / `accelerate launch` job."""
    return int(os.environ.get("RANK", "0")) == 0


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList with one entry per hidden layer)."""
    layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise SsahError(f"found no list of {layers} decoder blocks in {type(model).__name__} to shard")


def shard_model(model: nn.Module, bf16: bool = False) -> None:
    """Shard `model` in place over every process of the initialised process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise SsahError("--shard fsdp2 needs several processes: start with torchrun --nproc_per_node N "
                        "or accelerate launch --num_processes N")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options: dict = {"mesh": init_device_mesh(device, (dist.get_world_size(),))}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def is_sharded(tensor: torch.Tensor) -> bool:
    return _dtensor is not None and isinstance(tensor, _dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds (itself when not sharded); writes reach the parameter."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def row_offset(param: torch.Tensor) -> int:
    """First row (dim 0) of `param` held by this process: FSDP2 cuts dim 0 into ceil(n / world) rows."""
    from torch.distributed.tensor import Shard

    if not is_sharded(param):
        return 0
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise SsahError(f"unit freezing supports dim-0 FSDP2 shards, got placements {param.placements}")
    mesh = param.device_mesh
    per_rank = -(-param.shape[0] // mesh.size())
    return mesh.get_local_rank() * per_rank


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather when sharded: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered whole onto the CPU of the main process ({} on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
