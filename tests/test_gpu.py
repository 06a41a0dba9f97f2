"""CUDA checks, skipped without a GPU (run by benchmarks/gpu_check.py on a GPU machine)."""
import numpy as np
import pytest
import torch
from conftest import SMALL, sines

from pipeline import config as C
from pipeline.data.loader import WindowLoader
from pipeline.data.windows import starts_between
from pipeline.training.jobs import run_job, run_jobs_locally
from pipeline.training.plan import plan_jobs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_batches_gathered_on_the_gpu_equal_the_cpu_ones():
    arrays = sines(5)
    idx = starts_between(np.zeros(5), arrays.lengths - 60)
    loc, scale = np.zeros(5), np.ones(5)
    cpu = WindowLoader(arrays, 48, 12, loc, scale, calendar=["hour"], device="cpu")
    gpu = WindowLoader(arrays, 48, 12, loc, scale, calendar=["hour"], device="cuda")
    s, t = torch.from_numpy(idx.series[:200]), torch.from_numpy(idx.start[:200])
    a, b = cpu.gather(s, t), gpu.gather(s, t)
    assert b.x.device.type == "cuda"
    torch.testing.assert_close(a.x, b.x.cpu())
    torch.testing.assert_close(a.y, b.y.cpu())


@pytest.mark.parametrize("encoder", ["gru", "cnn"])
def test_training_on_cuda_with_bf16_learns(encoder):
    cfg = C.load(None, [*SMALL, "train.device=cuda", "train.precision=bf16", "train.epochs=6",
                        f"model.encoder.type={encoder}", "model.encoder.num_layers=4"])
    res = run_job(sines(), plan_jobs(sines(), cfg)[0], cfg)
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]


def test_packed_equals_separate_on_cuda():
    arrays = sines(6, groups=["a", "b"])
    base = [*SMALL, "train.device=cuda", "train.precision=fp32", "model.encoder.type=cnn",
            "train.mode=per_group", "data.group_col=g", "train.epochs=2",
            "train.steps_per_epoch=4"]
    jobs = plan_jobs(arrays, C.load(None, base))
    packed = run_jobs_locally(arrays, jobs, C.load(None, [*base, "train.per_group.packed=true",
                                                          "train.pack=always"]))
    for job, p in zip(jobs, packed, strict=True):
        alone = run_job(arrays, job, C.load(None, base))
        assert p.best_val == pytest.approx(alone.best_val, rel=1e-3)
