"""Packed per-group training (train.per_group.packed) equals training each group on its own."""

import pytest
import torch
from conftest import SMALL, sines, weights

from pipeline import config as C
from pipeline.training.jobs import run_job, run_jobs_locally
from pipeline.training.plan import plan_jobs


@pytest.mark.parametrize("encoder,pack", [("cnn", "always"), ("gru", "always"), ("cnn", "never")])
def test_packed_equals_separate_training(encoder, pack):
    """Groups packed (train.pack: always) or one after another with the pack's steps (never)
    equal each group trained on its own."""
    arrays = sines(9, length=260, groups=["a", "b", "c"])
    arrays.status[0] = 1  # groups of different sizes
    base = [*SMALL, f"model.encoder.type={encoder}", "model.encoder.num_layers=2",
            "train.mode=per_group", "data.group_col=g", "train.epochs=4",
            "train.steps_per_epoch=5", "train.grad_clip=0.5", "train.patience=2"]
    packed_cfg = C.load(None, [*base, "train.per_group.packed=true", f"train.pack={pack}"])
    separate_cfg = C.load(None, base)
    jobs = plan_jobs(arrays, separate_cfg)
    packed = {r.name: r for r in run_jobs_locally(arrays, jobs, packed_cfg)}
    for job in jobs:
        alone = run_job(arrays, job, separate_cfg)
        p = packed[job.name]
        assert p.ok and p.best_epoch == alone.best_epoch
        assert p.best_val == pytest.approx(alone.best_val, rel=1e-4)
        a, b = weights(p), weights(alone)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{job.name}: {k}")


def test_packed_reports_groups_without_windows():
    arrays = sines(6, groups=["a", "b"])
    arrays.status[arrays.groups == "b"] = 1
    cfg = C.load(None, [*SMALL, "train.mode=per_group", "data.group_col=g", "train.epochs=1",
                        "train.steps_per_epoch=2", "train.per_group.packed=true",
                        "model.encoder.type=cnn"])
    by = {r.name: r for r in run_jobs_locally(arrays, plan_jobs(arrays, cfg), cfg)}
    assert by["a"].ok and not by["b"].ok and "no training windows" in by["b"].error


def test_packed_config_is_checked():
    with pytest.raises(C.ConfigError, match="needs train.mode = 'per_group'"):
        C.load(None, ["train.per_group.packed=true", "train.pack=always"])
    with pytest.raises(C.ConfigError, match=r"packed models support encoder ffn \| cnn \| gru; "
                       "got model.encoder.type = 'lstm'"):
        C.load(None, ["train.per_group.packed=true", "train.mode=per_group",
                      "data.group_col=g", "model.encoder.type=lstm"])


def test_a_packed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """The pack fails in epoch 3 after the checkpoint of epoch 2; run again, every group
    resumes at epoch 3 and ends bit-identical to a pack that never stopped."""
    import pipeline.training.loop as T
    arrays = sines(9, length=260, groups=["a", "b", "c"])
    base = [*SMALL, "model.encoder.type=cnn", "train.mode=per_group", "data.group_col=g",
            "train.epochs=4", "train.steps_per_epoch=3", "train.per_group.packed=true",
            "train.pack=always", "train.scheduler=cosine"]
    cfg = C.load(None, [*base, "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}"])
    jobs = plan_jobs(arrays, cfg)
    clean = run_jobs_locally(arrays, jobs, C.load(None, [*base, "train.checkpoint_minutes=null"]))
    real, calls = T.validate, []

    def dies_in_epoch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(T, "validate", dies_in_epoch_3)
    assert not any(r.ok for r in run_jobs_locally(arrays, jobs, cfg))
    monkeypatch.setattr(T, "validate", real)
    resumed = run_jobs_locally(arrays, jobs, cfg)
    for r, c in zip(resumed, clean, strict=True):
        assert r.ok and r.resumed_epoch == 2 and r.attempts == 2 and c.resumed_epoch == 0
        assert [h["train_loss"] for h in r.history] == [h["train_loss"] for h in c.history]
        a, b = weights(r), weights(c)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("loss", ["mase", "smape"])
def test_packed_equals_separate_training_with_scaled_losses(loss):
    """MASE and sMAPE take each window's loc, scale and weight: under vmap the per-member
    [G, B] tensors are batched like the predictions, so each group still trains as alone."""
    arrays = sines(6, length=260, groups=["a", "b"])
    base = [*SMALL, "model.encoder.type=cnn", "train.mode=per_group", "data.group_col=g",
            "train.epochs=2", "train.steps_per_epoch=3", f"model.loss={loss}",
            "windows.scaling=window"]
    separate_cfg = C.load(None, base)
    jobs = plan_jobs(arrays, separate_cfg)
    packed = {r.name: r for r in run_jobs_locally(
        arrays, jobs, C.load(None, [*base, "train.per_group.packed=true", "train.pack=always"]))}
    for job in jobs:
        alone = run_job(arrays, job, separate_cfg)
        assert packed[job.name].best_val == pytest.approx(alone.best_val, rel=1e-4)
        a, b = weights(packed[job.name]), weights(alone)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{job.name}: {k}")
