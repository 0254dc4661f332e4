"""SFT on the tiny model: it learns, hands off through init_from, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import demo_datamodule, sft_module, trainer
from vlm_post.callbacks import HFExport
from vlm_post.errors import RunStopped

pytestmark = pytest.mark.slow


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_sft_fit_lowers_loss_and_learns_the_format(tiny_model, demo_data, tmp_path):
    torch.manual_seed(0)
    module, record = sft_module(tiny_model), RecordLoss()
    dm = demo_datamodule(demo_data, batch_size=8)
    trainer(tmp_path, max_steps=40, callbacks=[record]).fit(module, dm)
    first, last = sum(record.losses[:5]) / 5, sum(record.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    results = trainer(tmp_path, max_steps=1, limit_test_batches=1).test(module, dm, verbose=False)
    assert results[0]["test/demo_test/format_rate"] == 1.0  # it now always answers in \boxed{}


def test_handoff_export_then_init_from(tiny_model, demo_data, tmp_path):
    torch.manual_seed(0)
    stage1 = sft_module(tiny_model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    export = HFExport(dirpath=str(tmp_path / "export"), weights="last")
    trainer(tmp_path, max_steps=3, callbacks=[checkpoint, export], enable_checkpointing=True).fit(
        stage1, demo_datamodule(demo_data)
    )
    trained = _weights(stage1)
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "export" / "processor_config.json").exists()

    for init_from in (tmp_path / "export", tmp_path / "ckpt" / "last.ckpt"):
        seen = {}

        class AtStart(Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                seen["step"] = trainer.global_step
                seen["weights"] = _weights(pl_module)
                seen["optimizer_state"] = len(trainer.optimizers[0].state)

        stage2 = sft_module(tiny_model, init_from=str(init_from))
        trainer(tmp_path / "stage2", max_steps=1, callbacks=[AtStart()]).fit(stage2, demo_datamodule(demo_data))
        assert seen["step"] == 0 and seen["optimizer_state"] == 0, init_from
        for key, value in trained.items():
            assert torch.equal(seen["weights"][key], value), (init_from, key)


def test_resume_restores_optimizer_scheduler_and_step(tiny_model, demo_data, tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = sft_module(tiny_model)
    trainer(tmp_path, max_steps=4, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, demo_datamodule(demo_data)
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved_adam = saved["optimizer_states"][0]["state"]
    assert saved["global_step"] == 4

    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            optimizer = trainer.optimizers[0]
            seen["step"] = trainer.global_step
            seen["adam"] = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
            seen["sched_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
            seen["weights"] = _weights(pl_module)

    resumed = sft_module(tiny_model)
    trainer(tmp_path / "resume", max_steps=6, callbacks=[AtStart()]).fit(
        resumed, demo_datamodule(demo_data), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert seen["step"] == 4 and seen["sched_epoch"] == 4
    assert len(seen["adam"]) == len(saved_adam)
    for index, state in saved_adam.items():
        assert torch.equal(seen["adam"][index]["exp_avg"], state["exp_avg"])
        assert float(seen["adam"][index]["step"]) == 4
    for key, value in saved["state_dict"].items():
        if key.startswith("policy."):
            assert torch.equal(seen["weights"][key[len("policy.") :]], value), key
    assert resumed.trainer.global_step == 6


def test_nonfinite_sft_loss_is_skipped(tiny_model, demo_data, tmp_path, monkeypatch):
    from vlm_post.modules import sft

    monkeypatch.setattr(sft, "sft_cross_entropy", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), 1))
    module = sft_module(tiny_model)
    module.configure_model()
    before = _weights(module)
    run = trainer(tmp_path, max_steps=2)
    run.fit(module, demo_datamodule(demo_data))
    assert module.skipped_steps == 2 and run.global_step == 2, "a skipped step counts: max_steps ends the run"
    assert all(torch.equal(v, before[k]) for k, v in _weights(module).items())

    stopping = sft_module(tiny_model, max_consecutive_skips=2)
    with pytest.raises(RunStopped, match="2 optimizer step.s. in a row"):
        trainer(tmp_path, max_steps=10).fit(stopping, demo_datamodule(demo_data))
    assert stopping.skipped_steps == 2


def test_nonfinite_sft_gradient_is_skipped_and_no_checkpoint_holds_a_nan(tiny_model, demo_data, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient is skipped too; a save of non-finite weights is refused, the last one kept."""
    module = sft_module(tiny_model)
    module.configure_model()
    first_weight = next(p for p in module.policy.parameters() if p.ndim == 2)
    first_weight.register_hook(lambda grad: grad * float("nan") if module.global_step == 1 else grad)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    run = trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt])
    run.fit(module, demo_datamodule(demo_data))
    assert module.skipped_steps == 1 and run.global_step == 3

    class PoisonBeforeSave(Callback):  # what a bug elsewhere could do: a NaN weight at save time
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(pl_module.policy.parameters()).view(-1)[0] = float("nan")

    module = sft_module(tiny_model)
    saves = ModelCheckpoint(dirpath=tmp_path / "saves", every_n_train_steps=1, save_top_k=-1, save_last=True)
    with pytest.raises(RunStopped, match="refusing to save the checkpoint of step 2: 1 of .* tensors are non-finite"):
        trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[PoisonBeforeSave(), saves]).fit(
            module, demo_datamodule(demo_data)
        )
    kept = sorted(path.name for path in (tmp_path / "saves").iterdir())
    assert kept == ["epoch=0-step=1.ckpt", "last.ckpt"], kept
    state = torch.load(tmp_path / "saves" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
