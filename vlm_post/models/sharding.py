"""FSDP2 (``fully_shard``) for vlm_post's models, applied in ``configure_model`` under Lightning's ModelParallelStrategy.

Each transformer block (the classes the model lists in ``_no_split_modules``: Qwen2.5-VL's decoder layers and
vision blocks) becomes one FSDP unit, then the whole model (the root: embeddings, vision patch embedding and
merger, final norm, LM head). Frozen models (RL's reference, OPD's teacher) are sharded the same way, or kept
whole in CPU memory and streamed in (``frozen: offload``).

vlm_post computes losses from the decoder's hidden states and the head weight directly (chunked, so the
[tokens, vocabulary] logits never exist), and runs the base model itself for the shared-prompt forwards. Under
FSDP2 that only works inside the root's forward: its hooks gather the root's parameters there, keep them
gathered afterwards (FSDP2 never reshards the root after forward, as backward needs them at once) and schedule
the reduce-scatter of their gradients. ``root_forward`` makes such a computation run as the root module's forward.
Generation gathers every unit once for the whole ``generate`` call (``gathered``), as verl does, instead of an
all-gather per layer per new token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.internals import reshards_after_forward, settle_fsdp_root
from vlm_post.ranges import PositiveInt, check_ranges

DtypeName = Literal["float32", "bfloat16", "float16"]


@dataclass
class FSDPConfig:
    """How the policy (and the frozen models) are sharded under ``strategy: ModelParallelStrategy``.

    Args:
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3, least
            memory); False keeps them until backward (ZeRO-2-like, fewer all-gathers).
        replicas: hybrid sharding (HSDP): shard within groups of ``world_size / replicas`` ranks (one node,
            say) and replicate across the groups, so only gradient all-reduces cross nodes. 1: full sharding.
        param_dtype: dtype of the gathered parameters in forward and backward (``bfloat16`` for mixed
            precision; the sharded master weights keep the module's ``dtype``). None: as stored.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32`` with bf16 parameters). None: param_dtype.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory.
        frozen: the reference model (RL) and in-process teacher (OPD): ``shard`` like the policy, or
            ``offload`` (sharded, parameters in CPU memory between forwards).
    """

    reshard_after_forward: bool = True
    replicas: PositiveInt = 1
    param_dtype: DtypeName | None = None
    reduce_dtype: DtypeName | None = None
    cpu_offload: bool = False
    frozen: Literal["shard", "offload"] = "shard"

    def __post_init__(self) -> None:
        check_ranges(self)


def data_parallel_mesh(device_mesh, replicas: int):
    """The mesh the model is sharded over: the strategy's data-parallel ranks, split ``replicas`` ways for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    if replicas == 1:
        return mesh
    size = mesh.size()
    if replicas < 1 or size % replicas:
        raise ConfigError(f"model.fsdp.replicas ({replicas}) must divide the {size} data-parallel ranks")
    return init_device_mesh(mesh.device_type, (replicas, size // replicas), mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, mesh, config: FSDPConfig, frozen: bool = False) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the model; the model is the root of its FSDP tree."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ConfigError(
            f"{type(model).__name__} names no transformer blocks (_no_split_modules): FSDP has nothing to shard per layer"
        )
    dtype = lambda name: getattr(torch, name) if name else None
    offload = config.cpu_offload or (frozen and config.frozen == "offload")
    if offload and mesh.device_type == "cpu":
        raise ConfigError(
            "model.fsdp: cpu_offload (or frozen: offload) keeps GPU shards in CPU memory; on CPU processes they "
            "are there already: turn it off"
        )
    options = dict(
        mesh=mesh,
        reshard_after_forward=config.reshard_after_forward or frozen,
        mp_policy=MixedPrecisionPolicy(param_dtype=dtype(config.param_dtype), reduce_dtype=dtype(config.reduce_dtype)),
        offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
    )
    for block in blocks:
        fully_shard(block, **options)
    # None: FSDP2's own choice for the root, which keeps its parameters gathered after forward (the loss uses the
    # head weight next); an explicit True would free them and leave the head a sharded DTensor.
    fully_shard(model, **{**options, "reshard_after_forward": None})
    # FSDP2 makes the first module to run forward its root. vlm_post also calls blocks outside the root's
    # forward (a shared-prompt prefill, generation), so settle the root now.
    settle_fsdp_root(model)
    for unit in _units(model):  # what ``gathered`` restores (the root, as FSDP2 sets it, does not reshard)
        unit._vlm_post_reshard = reshards_after_forward(unit)
    return model


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def root_forward(compute: Callable) -> Callable:
    """Decorator: ``compute(model, *args)`` runs as ``model``'s own forward when ``model`` is FSDP-sharded (else it
    is a plain call).

    Inside it the root's parameters (embeddings, head, ...) are gathered and stay so for a loss that uses the
    head weight afterwards; their gradients are reduce-scattered at the end of backward. FSDP casts the
    floating-point tensors of ``args`` (dataclasses and dicts included) as it casts a forward's inputs.
    """

    @functools.wraps(compute)
    def run(model: torch.nn.Module, *args, **kwargs):
        if not is_sharded(model):
            return compute(model, *args, **kwargs)

        def forward(*args, **kwargs):
            out = compute(model, *args, **kwargs)
            # FSDP2 hooks the root's outputs for backward; an in-place op on a view would drop the hook, so a view
            # (a slice of the hidden states) is handed out as a tensor of its own.
            return out.clone() if isinstance(out, torch.Tensor) and out._base is not None else out

        model.forward = forward  # an instance attribute, looked up before the class's forward
        try:
            return model(*args, **kwargs)
        finally:
            del model.forward

    return run


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``model`` gathered for the duration (one all-gather each), resharded after.

    Generation runs one forward per new token; without this each would all-gather every layer again. It also
    makes the decode steps collective-free, so ranks whose samples stop at different lengths do not wait for
    one another.
    """
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    model.set_reshard_after_forward(False, recurse=True)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in units:
            unit.set_reshard_after_forward(getattr(unit, "_vlm_post_reshard", True), recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Under FSDP2 or an FSDP1 root, a collective: the whole model's weights in CPU memory on rank 0, empty on the
    others. Otherwise the model's own state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not (is_sharded(model) or isinstance(model, FullyShardedDataParallel)):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a parameter or gradient under FSDP2); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_weight_buckets(model: torch.nn.Module, bucket_mb: float) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's weights as full tensors, under their state-dict (HF checkpoint) names, in consecutive buckets of
    about ``bucket_mb`` MB. A bucket holds whole blocks (``weight_unit``): vLLM fuses a block's projections (q, k, v
    into one qkv; gate and up) and updates a fused layer only from a call that brings all of its parts. A block
    larger than ``bucket_mb`` is a bucket of its own.

    Under FSDP2 each parameter is all-gathered as its bucket fills, so at most one bucket of full tensors exists at a
    time: a collective, every rank must consume every bucket. Unsharded models give their own tensors.
    """
    from torch.distributed.tensor import DTensor

    limit, bucket, size, unit = bucket_mb * 2**20, [], 0, None
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        nbytes, previous, unit = full.numel() * full.element_size(), unit, weight_unit(name)
        if bucket and unit != previous and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, full.detach()))
        size += nbytes
    if bucket:
        yield bucket


def weight_unit(name: str) -> str:
    """The block a weight belongs to: its name up to the first index (``model.language_model.layers.3``), else its
    module (``model.language_model.norm``)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[: index + 1] if index is not None else parts[:-1])
