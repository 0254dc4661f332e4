"""The private Lightning and torch internals vlm_post depends on, reached from here alone.

Each is private API: a Lightning or torch upgrade may rename it. Each function says why no public way serves, and
which test fails first if it breaks, so an upgrade knows where to look.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def logger_writes_this_step(trainer) -> bool:
    """Whether Lightning writes the values a training step logs now (every ``trainer.log_every_n_steps``).

    Why: a value logged on any other step is only replaced by the next one, so the on-policy modules skip their
    per-step metrics (accuracy grading among them) there; Lightning keeps the decision in its logger connector.
    Breaks: tests/test_distill.py::test_step_metrics_are_computed_only_on_steps_the_logger_writes.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)


def load_fsdp1_full_checkpoints_with(load: Callable[[Any], Any]) -> None:
    """Make Lightning's FSDPStrategy (FSDP1) read full-state checkpoint files with ``load``.

    Why: Lightning reads them with its own lazy unpickler (``_lazy_load``), which fails on the files torch 2.14
    writes, and the strategy takes no loader. Breaks: tests/test_distributed.py::
    test_fsdp1_resumes_from_sharded_and_full_state_checkpoints.
    """
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    lightning_fsdp._lazy_load = load


def settle_fsdp_root(model: torch.nn.Module) -> None:
    """Make a ``fully_shard``-ed ``model`` the FSDP2 root now, not at its first forward.

    Why: FSDP2 makes the first module to run forward its root, and vlm_post runs blocks outside the root's
    forward (a shared-prompt prefill, generation); torch has no public call for it. Breaks:
    tests/test_distributed.py::test_rl_and_opd_take_sharded_steps.
    """
    model._get_fsdp_state()._lazy_init()


def reshards_after_forward(unit: torch.nn.Module) -> bool:
    """Whether an FSDP2 unit frees its gathered parameters after forward (FSDP2 decides for the root itself).

    Why: ``sharding.gathered`` restores each unit's own choice after a whole-model gather, and FSDP2 keeps it
    only in the unit's parameter group. Breaks: tests/test_distributed.py::test_rl_and_opd_take_sharded_steps.
    """
    group = unit._get_fsdp_state()._fsdp_param_group
    return bool(group is not None and group.post_forward_mesh_info is not None)


def shutdown_vllm_engine(llm, keep_process_group: bool) -> None:
    """Stop an in-process vLLM engine; with ``keep_process_group``, leave torch.distributed's default group alive.

    Why: vLLM's engine shutdown ends in ``destroy_distributed_environment``, which destroys the default process group.
    An engine colocated with the trainer (``external_launcher``) shares the trainer's group, which Lightning still
    needs after fit (its barriers, the checkpoint and the export): vLLM's own groups are destroyed, that one is kept.
    vLLM has no public call for either. Breaks: tests/test_vllm_rollouts.py::
    test_colocated_engines_sample_on_every_rank.
    """
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is None or not hasattr(engine_core, "shutdown"):
        return
    if not keep_process_group:
        engine_core.shutdown()
        return
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_vllm_groups_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_groups_only
    try:
        engine_core.shutdown()
    finally:
        parallel_state.destroy_distributed_environment = destroy
