"""Training on a real local Ray instance: per-group tasks and Ray Train DDP (gloo, 2 CPUs)."""

import numpy as np
import pytest
import torch
from conftest import SMALL, sines, weights

from pipeline import config as C
from pipeline.execution.ray_train import train, train_global_ddp
from pipeline.training.jobs import run_job, run_jobs_locally
from pipeline.training.plan import plan_jobs, plan_packs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_per_group_tasks_equal_local_and_report_a_failing_group(ray_session):
    arrays = sines(9, groups=["a", "b", "c"])
    arrays.status[arrays.groups == "c"] = 1  # c has no usable series, so no windows
    cfg = C.load(None, [*SMALL, "train.epochs=1", "train.steps_per_epoch=3",
                        "train.mode=per_group", "data.group_col=g", "ray.max_retries=1"])
    jobs = plan_jobs(arrays, cfg)
    remote = {r.name: r for r in train(arrays, plan_packs(jobs, cfg), cfg)}
    local = {r.name: r for r in run_jobs_locally(arrays, jobs, cfg)}
    assert [remote[g].ok for g in "abc"] == [True, True, False]
    # reported at once: retrying cannot give a job windows (a raising task is retried, see
    # test_a_killed_per_group_task_resumes_from_its_checkpoint)
    assert "no training windows" in remote["c"].error and remote["c"].attempts == 1
    for g in "ab":
        a, b = weights(remote[g]), weights(local[g])
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_ddp_with_two_workers_trains_close_to_one_worker(ray_session, tmp_path):
    arrays = sines(8, length=240)
    base = [*SMALL, "train.epochs=4", "train.device=cpu", "model.encoder.type=cnn",
            "model.encoder.num_layers=4"]
    one = C.load(None, [*base, "train.batch_size=64"])
    two = C.load(None, [*base, "train.batch_size=32", "ray.num_workers=2"])  # same global batch
    job = plan_jobs(arrays, one)[0]
    single = run_job(arrays, job, one)
    # the workers log into an existing run (rank 0 only), as a tracked pipeline run does
    mlflow = pytest.importorskip("mlflow")
    from pipeline.tracking import EpochLogger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("ddp")).info.run_id
    ddp = train_global_ddp(arrays, job, two, log=EpochLogger(uri, run_id))
    assert ddp.ok, ddp.error
    assert ddp.logged and not ddp.log_errors
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(len(ddp.history)))       # once per epoch: rank 0 alone
    assert len(client.search_experiments()) == 2                 # Default + ddp: none added
    first, last = ddp.history[0]["train_loss"], ddp.history[-1]["train_loss"]
    assert last < 0.7 * first  # it trains
    assert abs(ddp.best_val - single.best_val) < 0.25 * single.best_val
    assert np.isfinite([h["val_loss"] for h in ddp.history]).all()


class DieOnce:
    """A log callback that SIGKILLs its own Ray worker in `epoch` the first time (a marker
    file remembers), as a lost node or an OOM kill would."""

    def __init__(self, marker, epoch: int):
        self.marker, self.epoch = str(marker), epoch

    def __call__(self, row):
        import os
        import signal
        if row["epoch"] == self.epoch and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_per_group_task_resumes_from_its_checkpoint(ray_session, tmp_path):
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    arrays = sines(6, groups=["a", "b"])
    cfg = C.load(None, [*SMALL, "train.epochs=4", "train.steps_per_epoch=3",
                        "train.mode=per_group", "data.group_col=g", "ray.max_retries=2",
                        "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}/ck"])
    jobs = plan_jobs(arrays, cfg)
    remote = {r.name: r for r in train(
        arrays, plan_packs(jobs, cfg), cfg, loggers={"a": DieOnce(tmp_path / "died", 2)})}
    assert (tmp_path / "died").exists()
    assert remote["a"].ok and remote["a"].resumed_epoch == 2 and remote["a"].attempts == 2
    assert remote["b"].resumed_epoch == 0 and remote["b"].attempts == 1
    local = {r.name: r for r in run_jobs_locally(arrays, jobs, C.load(
        None, [*SMALL, "train.epochs=4", "train.steps_per_epoch=3", "train.mode=per_group",
               "data.group_col=g", "train.checkpoint_minutes=null"]))}
    for g in "ab":
        assert len(remote[g].history) == 4
        a, b = weights(remote[g]), weights(local[g])
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "ck").rglob("*.ckpt"))


class FailIn:
    """A log callback (rank 0's) that raises in `epoch`."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def __call__(self, row):
        if row["epoch"] == self.epoch:
            raise RuntimeError(f"failed in epoch {self.epoch}")


def test_a_failed_ddp_run_resumes_every_rank_from_rank_0s_checkpoint(ray_session, tmp_path):
    """Rank 0 fails in epoch 2 after saving epoch 1; the rerun's rank 0 reads the checkpoint
    and broadcasts it, so both ranks resume at epoch 2 (same number of ranks: the key holds
    it, since the shards and the schedule depend on it)."""
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    arrays = sines(8, length=240)
    cfg = C.load(None, [*SMALL, "train.epochs=3", "train.batch_size=32", "ray.num_workers=2",
                        "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}"])
    job = plan_jobs(arrays, cfg)[0]
    first = train_global_ddp(arrays, job, cfg, log=FailIn(1))
    assert not first.ok and "failed in epoch 1" in first.error
    assert len(list(tmp_path.rglob("*.ckpt"))) == 1
    ddp = train_global_ddp(arrays, job, cfg)
    assert ddp.ok, ddp.error
    assert ddp.resumed_epoch == 1 and [h["epoch"] for h in ddp.history] == [0, 1, 2]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_ensembles_members_train_as_tasks_of_their_own_equal_to_local(ray_session,
                                                                          tmp_path,
                                                                          monkeypatch):
    """On a CPU (`train.pack: auto`) each member is a Ray task; the job's Ensemble, figures
    and member rows equal training it in this process, bit for bit (threads pinned), and
    member 0 logs the job's epochs into its run. The driver's line shows every member's
    epochs as it trains ('global member 3/4 epoch 2/2 …'), not member 0's alone."""
    from pipeline.execution import ray_train
    from pipeline.execution.ray_train import spreads_members
    shown = []
    real_status = ray_train.job_status
    monkeypatch.setattr(ray_train, "job_status",
                        lambda job, row, epochs: shown.append(job) or real_status(job, row,
                                                                                  epochs))
    arrays = sines(6, length=260)
    cfg = C.load(None, [*SMALL, "model.encoder.type=cnn", "windows.lookback=24",
                        "train.epochs=2", "train.steps_per_epoch=3", "train.threads=1",
                        "model.ensemble.members=4", "model.ensemble.lookbacks=[1, 2]",
                        "model.ensemble.losses=[mae, mase]"])
    jobs = plan_jobs(arrays, cfg)
    assert spreads_members(cfg, plan_packs(jobs, cfg))
    assert not spreads_members(C.load(None, ["model.ensemble.members=4", "train.pack=always"]),
                               [jobs])
    mlflow = pytest.importorskip("mlflow")
    from pipeline.tracking import EpochLogger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("members")).info.run_id
    (remote,) = train(arrays, plan_packs(jobs, cfg), cfg,
                      loggers={"global": EpochLogger(uri, run_id)})
    (local,) = run_jobs_locally(arrays, jobs, cfg)
    assert remote.ok and remote.logged and remote.node
    a, b = weights(remote), weights(local)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["best_epoch"] for m in remote.members] == [m["best_epoch"] for m in local.members]
    timeless = [[{k: v for k, v in row.items() if k != "samples_per_s"} for row in r.history]
                for r in (remote, local)]
    assert timeless[0] == timeless[1] and remote.spec == local.spec
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(len(local.history)))      # member 0's epochs, once
    assert {f"global member {k}/4" for k in range(1, 5)} <= set(shown)
