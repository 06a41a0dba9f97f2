"""What makes training cheap without changing it: validation batches gathered once per fit,
the torch threads a pinned and logged setting, members packed only where packing pays."""

import numpy as np
import pytest
import torch
from conftest import SMALL, sines, weights

import pipeline.training.loop as T
import pipeline.training.valset as valset
from pipeline import config as C
from pipeline.config.recipes import resolve_threads
from pipeline.data.loader import WindowLoader
from pipeline.outputs import console as report
from pipeline.training.device import packs, torch_threads
from pipeline.training.jobs import run_job
from pipeline.training.plan import Job, plan_jobs

BASE = [*SMALL, "train.epochs=3", "train.steps_per_epoch=3", "train.patience=5"]


@pytest.mark.parametrize("members", [1, 3])
def test_validation_batches_are_gathered_once_per_fit(members, monkeypatch):
    """Kept: the validation windows are gathered in the first epoch only; not kept (over the
    memory budget): every epoch. Losses and weights are the same either way."""
    arrays = sines(6)
    cfg = C.load(None, [*BASE, f"model.ensemble.members={members}", "train.pack=always",
                        "model.ensemble.lookbacks=[4]", "model.encoder.type=cnn"]
                 if members > 1 else BASE)
    (job,) = plan_jobs(arrays, cfg)
    real, calls = WindowLoader.gather, []

    def counted(self, series, start, with_target=True, *, in_table=None):
        calls.append(len(series))
        return real(self, series, start, with_target, in_table=in_table)
    monkeypatch.setattr(WindowLoader, "gather", counted)
    kept = run_job(arrays, job, cfg)
    val_batches = len(calls) - 3 * 3 * members           # training: 3 epochs × 3 steps
    monkeypatch.setattr(valset, "VAL_CACHE_BYTES", 0)
    calls.clear()
    again = run_job(arrays, job, cfg)
    assert len(calls) - 9 * members == 3 * val_batches > 0
    assert [h["val_loss"] for h in kept.history] == [h["val_loss"] for h in again.history]
    a, b = weights(kept), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert kept.best_val == again.best_val


def test_a_fit_reports_its_training_and_validation_seconds():
    from pipeline.models import make_loss
    from pipeline.training.jobs import job_data, new_model
    arrays = sines(4)
    cfg = C.load(None, BASE)
    data = job_data(arrays, plan_jobs(arrays, cfg)[0], cfg, torch.device("cpu"))
    model = new_model(data.loader, cfg, len(arrays), 0)
    (res,) = T.fit(model, [data], cfg.train, make_loss(cfg.model), progress=False)
    assert 0 < res.val_seconds < res.train_seconds + res.val_seconds <= res.seconds


def test_threads_auto_resolves_to_what_training_will_use():
    local = C.load(None, ["ray.enabled=false"])
    with torch_threads(3):
        assert resolve_threads(local).train.threads == 3       # this process's setting
    ray = C.load(None, ["ray.task_num_cpus=2"])
    assert resolve_threads(ray).train.threads == 2             # a task's CPUs
    assert resolve_threads(C.load(None, ["ray.task_num_cpus=0.5"])).train.threads == 1
    pinned = C.load(None, ["train.threads=4"])
    assert resolve_threads(pinned) is pinned
    resolved = resolve_threads(local)
    assert resolved.explicit == local.explicit and resolved.to_dict()["train"]["threads"] >= 1


def threads_seen(monkeypatch, module, name: str) -> list[int]:
    """`module.name` patched to record torch's threads at each call; the record."""
    seen, real = [], getattr(module, name)

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)
    monkeypatch.setattr(module, name, spy)
    return seen


def test_training_runs_under_the_configured_threads(monkeypatch):
    import pipeline.training.jobs as J
    arrays = sines(4)
    seen = threads_seen(monkeypatch, J, "fit")
    before = torch.get_num_threads()
    for threads in (2, "auto"):
        cfg = C.load(None, [*BASE, f"train.threads={threads}", "train.epochs=1"])
        assert run_job(arrays, plan_jobs(arrays, cfg)[0], cfg).ok
    assert seen == [2, before] and torch.get_num_threads() == before   # restored after


def test_threads_are_part_of_a_checkpoints_identity():
    from pipeline.training.checkpoint import train_settings
    one, two = (C.load(None, [f"train.threads={n}"]) for n in (1, 2))
    assert train_settings(one) != train_settings(two)


def test_pack_auto_packs_on_gpus_only():
    auto, never, always = (C.load(None, [f"train.pack={p}"]).train
                           for p in ("auto", "never", "always"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not packs(auto, cpu) and packs(auto, cuda)
    assert packs(always, cpu) and not packs(never, cuda)
    with pytest.raises(C.ConfigError, match="train.pack = 'sometimes' is not one of"):
        C.load(None, ["train.pack=sometimes"])
    with pytest.raises(C.ConfigError, match="train.threads = 0 must be > 0"):
        C.load(None, ["train.threads=0"])


def test_the_training_line_says_threads_and_packing(capsys):
    cfg = C.load(None, ["model.ensemble.members=3", "model.ensemble.losses=[mae]",
                        "train.threads=2", "model.encoder.type=cnn", "ray.enabled=false"])
    report.training_start(cfg, [[Job("global", np.arange(4))]], torch.device("cpu"),
                          final=False)
    assert "device cpu, 2 threads, 3 members one after another" in capsys.readouterr().out
    report.training_start(cfg, [[Job("global", np.arange(4))]], torch.device("cuda"),
                          final=True)
    assert "device cuda, 2 threads, 3 members packed, final" in capsys.readouterr().out
    on_ray = C.load(None, ["model.ensemble.members=3", "model.encoder.type=cnn",
                           "train.threads=1"])
    report.training_start(on_ray, [[Job("global", np.arange(4))]], torch.device("cpu"),
                          final=False)
    assert "device cpu, 1 thread, 3 members a Ray task each" in capsys.readouterr().out


def test_forecasts_are_made_under_the_configured_threads(monkeypatch):
    """Inference too runs under train.threads (a Ray run's driver forecasts with the threads
    its tasks trained with; tests/test_cluster.py's two-node run equals the local one)."""
    import pipeline.forecasting.predict as F
    from pipeline.forecasting.predict import predict_job
    arrays = sines(4)
    cfg = C.load(None, [*BASE, "train.epochs=1", "train.threads=2"])
    res = run_job(arrays, plan_jobs(arrays, cfg)[0], cfg)
    seen = threads_seen(monkeypatch, F, "predict")
    before = torch.get_num_threads()
    eligible = arrays.status == 0
    predict_job(res.model(), arrays, cfg, arrays.lengths, eligible, with_target=False)
    assert seen == [2] and torch.get_num_threads() == before
