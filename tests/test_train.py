"""The training loop and the job layer, without Ray: learning, seeds, early stopping, logs."""
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import SMALL, sines

from pipeline import config as C
from pipeline.data.series import SeriesArrays
from pipeline.progress import Progress
from pipeline.training.jobs import run_job, run_jobs_locally
from pipeline.training.plan import Job, plan_jobs


@pytest.mark.parametrize("encoder", ["gru", "cnn"])
def test_loss_falls_on_learnable_data(encoder):
    cfg = C.load(None, [*SMALL, f"model.encoder.type={encoder}", "train.epochs=6",
                        "model.encoder.num_layers=4"] if encoder == "cnn" else
                 [*SMALL, f"model.encoder.type={encoder}", "train.epochs=6"])
    res = run_job(sines(), plan_jobs(sines(), cfg)[0], cfg)
    first, last = res.history[0], res.history[-1]
    assert res.ok and res.n_windows > 0
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert res.best_val < 0.5 * first["val_loss"]  # scaled MAE on held-out windows


def test_same_seed_same_data_gives_bit_identical_weights():
    cfg = C.load(None, [*SMALL, "train.epochs=2", "model.encoder.dropout=0.1",
                        "model.decoder.dropout=0.1", "train.steps_per_epoch=4"])
    arrays = sines(6)
    job = plan_jobs(arrays, cfg)[0]
    a = torch.load(io.BytesIO(run_job(arrays, job, cfg).state), weights_only=True)
    b = torch.load(io.BytesIO(run_job(arrays, job, cfg).state), weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg2 = C.load(None, [*SMALL, "train.epochs=2", "train.seed=1", "model.encoder.dropout=0.1",
                         "model.decoder.dropout=0.1", "train.steps_per_epoch=4"])
    c = torch.load(io.BytesIO(run_job(arrays, job, cfg2).state), weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_restores_the_best_epoch():
    cfg = C.load(None, [*SMALL, "train.epochs=30", "train.patience=2", "train.lr=0.05",
                        "train.scheduler=none"])
    res = run_job(sines(4), plan_jobs(sines(4), cfg)[0], cfg)
    vals = [h["val_loss"] for h in res.history]
    assert len(vals) < 30 and len(vals) - 1 - res.best_epoch == 2
    assert res.best_val == min(vals)
    model = res.model()  # the restored weights are the best epoch's
    assert sum(p.numel() for p in model.parameters()) > 0
    # rebuilt from the bytes once: saving, logging, backtest and forecast share the module;
    # a pickled result (what a Ray task returns) carries the bytes alone
    assert res.model() is model
    again = pickle.loads(pickle.dumps(res))
    assert again._model is None and again.model() is not model
    assert all(torch.equal(a, b) for a, b in zip(again.model().state_dict().values(),
                                                  model.state_dict().values(), strict=True))


def test_steps_per_epoch_and_schedulers_set_the_learning_rate():
    """2 epochs × 3 steps: cosine annealing is at half the rate after epoch 1 (step 3 of 6)
    and at 0 after epoch 2; one-cycle has passed its peak (lr, at 30 % of the steps) after
    epoch 1 and keeps annealing."""
    lr = 0.003
    for sched in ("cosine", "onecycle"):
        cfg = C.load(None, [*SMALL, "train.epochs=2", "train.steps_per_epoch=3",
                            f"train.scheduler={sched}", "train.optimizer=adamw"])
        res = run_job(sines(3), plan_jobs(sines(3), cfg)[0], cfg)
        assert [h["epoch"] for h in res.history] == [0, 1]
        lrs = [h["lr"] for h in res.history]
        if sched == "cosine":
            assert lrs[0] == pytest.approx(lr * 0.5, rel=1e-9)
            assert lrs[1] == pytest.approx(0.0, abs=1e-12)
        else:
            assert lr / 25 < lrs[0] < lr and lrs[1] < lrs[0]


def test_a_failing_job_is_reported_and_the_others_complete():
    arrays = sines(6, groups=["a", "b"])
    arrays.status[arrays.groups == "b"] = 1  # every series of b skipped: b has no windows
    cfg = C.load(None, [*SMALL, "train.epochs=1", "train.mode=per_group", "data.group_col=g"])
    results = run_jobs_locally(arrays, plan_jobs(arrays, cfg), cfg)
    by = {r.name: r for r in results}
    assert by["a"].ok and by["a"].state
    assert not by["b"].ok and "no training windows" in by["b"].error


def test_embeddings_and_quantiles_train():
    arrays = sines(6, groups=["a", "b"])
    cfg = C.load(None, [*SMALL, "train.epochs=1", "model.embedding=group", "data.group_col=g",
                        "model.loss=quantile", "model.quantiles=[0.1, 0.5, 0.9]"])
    res = run_job(arrays, Job("global", np.arange(6)), cfg)
    assert res.ok and math.isfinite(res.best_val)


def test_progress_is_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    now = [0.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: now[0])
    p = Progress(3, stream=out, steps=10, every=10)        # t0 = last = 0
    for step, t, loss in ((1, 5.0, 9.9), (2, 12.0, 0.5), (3, 13.0, 0.25)):
        now[0] = t                                         # a line at 12 s only
        p.step(step, lambda v=loss: v)
    now[0] = 30.0
    p.update({"epoch": 0, "train_loss": 1.0, "val_loss": 2.0, "samples_per_s": 1234.0})
    p.note("early stop")
    assert out.getvalue() == ("epoch 1/3 step 2/10 loss 0.5000  (12 s, about 168 s left)\n"
                              "epoch 1/3  train 1.0000  val 2.0000  1,234 samples/s\n"
                              "early stop\n")
    assert p.status(4) == "epoch 2/3 step 4/10  (30 s, about 60 s left)"   # 10 of 30 in 30 s


def test_fit_ticks_each_step_to_a_log_that_follows_steps():
    arrays = sines(4)
    cfg = C.load(None, [*SMALL, "train.epochs=2", "train.steps_per_epoch=3"])
    seen = []

    class Log:
        def __call__(self, row):
            seen.append(("epoch", row["epoch"]))

        def tick(self, step, loss):
            seen.append(("step", step, round(loss(), 6) > 0))
    run_job(arrays, Job("global", np.arange(4)), cfg, log=Log())
    assert seen == [("step", 1, True), ("step", 2, True), ("step", 3, True), ("epoch", 0),
                    ("step", 1, True), ("step", 2, True), ("step", 3, True), ("epoch", 1)]


class Crash(Exception):
    pass


def crash_at(epoch):
    def log(row):
        if row["epoch"] == epoch:
            raise Crash(f"killed in epoch {epoch}")
    return log


def state(res):
    return torch.load(io.BytesIO(res.state), weights_only=True)


@pytest.mark.parametrize("encoder", ["gru", "cnn"])
def test_a_job_resumed_from_its_checkpoint_ends_bit_identical(tmp_path, encoder):
    """Killed in epoch 4 (after the checkpoint of epoch 3), run again: it resumes at epoch 4
    and ends with the weights, history and best epoch of a run that never stopped — dropout,
    the cosine schedule, Adam's moments and early-stopping state included."""
    cfg = C.load(None, [*SMALL, f"model.encoder.type={encoder}", "train.epochs=6",
                        "train.steps_per_epoch=4", "model.encoder.dropout=0.1",
                        "model.decoder.dropout=0.2", "train.scheduler=cosine",
                        "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}/ck"])
    arrays = sines(6)
    job = plan_jobs(arrays, cfg)[0]
    clean = run_job(arrays, job, C.load(None, [*SMALL, f"model.encoder.type={encoder}",
                                               "train.epochs=6", "train.steps_per_epoch=4",
                                               "model.encoder.dropout=0.1",
                                               "model.decoder.dropout=0.2",
                                               "train.scheduler=cosine",
                                               "train.checkpoint_minutes=null"]))
    with pytest.raises(Crash):
        run_job(arrays, job, cfg, log=crash_at(4))
    (ckpt,) = (tmp_path / "ck" / "backtest").iterdir()
    assert ckpt.name.startswith(f"{cfg.model.name}-global-") and ckpt.suffix == ".ckpt"
    seen = []
    resumed = run_job(arrays, job, cfg, log=seen.append)
    assert resumed.resumed_epoch == 4 and resumed.attempts == 2 and clean.attempts == 1
    assert [r["epoch"] for r in seen] == [0, 1, 2, 3, 4, 5]   # 0-3 replayed (EpochLogger
                                                              # skips those in its run)
    a, b = state(clean), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in clean.history]
    assert resumed.best_epoch == clean.best_epoch
    assert not ckpt.exists()                            # removed once the job finished


def test_a_checkpoint_of_other_training_is_not_resumed(tmp_path):
    base = [*SMALL, "train.epochs=3", "train.steps_per_epoch=2", "train.checkpoint_minutes=0",
            f"train.checkpoint_dir={tmp_path}"]
    arrays = sines(4)
    cfg = C.load(None, base)
    job = plan_jobs(arrays, cfg)[0]
    with pytest.raises(Crash):
        run_job(arrays, job, cfg, log=crash_at(2))
    other = C.load(None, [*base, "train.lr=0.01"])      # another config
    assert run_job(arrays, job, other).resumed_epoch == 0
    with pytest.raises(Crash):
        run_job(arrays, job, cfg, log=crash_at(2))
    changed = sines(4)
    changed.values[5] += 1.0                            # restated history
    assert run_job(changed, job, cfg).resumed_epoch == 0
    with pytest.raises(Crash):
        run_job(arrays, job, cfg, log=crash_at(2))
    moved = C.load(None, [*base, "train.device=cpu", "data.path=elsewhere"])
    assert run_job(arrays, job, moved).resumed_epoch == 2   # where it runs does not matter


def test_a_checkpoint_that_cannot_be_written_does_not_stop_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cfg = C.load(None, [*SMALL, "train.epochs=2", "train.steps_per_epoch=2",
                        "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}/file"])
    arrays = sines(3)
    with pytest.warns(UserWarning, match="checkpoint .* not written"):
        res = run_job(arrays, plan_jobs(arrays, cfg)[0], cfg)
    assert res.ok and len(res.history) == 2


def test_validation_uses_a_fixed_sample_of_at_most_val_max_windows():
    from pipeline.data.windows import WindowIndex
    from pipeline.training.loop import val_sample
    index = WindowIndex(np.repeat(np.arange(50), 40).astype(np.int32),
                        np.tile(np.arange(40), 50).astype(np.int32))
    cfg = C.load(None, ["train.val_max_windows=300"]).train
    a, b = val_sample(index, cfg, 64), val_sample(index, cfg, 64)
    assert len(a) == 300 and np.array_equal(a.series, b.series) and np.array_equal(a.start,
                                                                                   b.start)
    keys = a.series.astype(np.int64) * 40 + a.start
    assert np.all(np.diff(keys) > 0)                     # distinct windows, in index order
    assert len(np.unique(a.series)) > 40                 # drawn across the series
    assert val_sample(index, C.load(None, ["train.val_max_windows=null"]).train, 64) is index
    cfg2 = C.load(None, ["train.val_max_windows=300", "train.seed=1"]).train
    assert not np.array_equal(val_sample(index, cfg2, 64).start, a.start)
    auto = C.load(None, []).train                # auto: a quarter of an epoch's, >= 3,000
    assert auto.val_max_windows == "auto"
    big = WindowIndex(np.repeat(np.arange(200), 40).astype(np.int32),
                      np.tile(np.arange(40), 200).astype(np.int32))      # 8,000 windows
    assert len(val_sample(big, auto, 64)) == 3000 and len(val_sample(big, auto, 20_000)) == 5000
    assert val_sample(big, auto, 32_000) is big and val_sample(index, auto, 64) is index
    with pytest.raises(C.ConfigError, match="train.val_max_windows = 'some'"):
        C.load(None, ["train.val_max_windows=some"])


def test_a_checkpoint_from_before_other_series_changed_the_model_is_not_resumed(tmp_path):
    """Per-group models with a series embedding have one row per series of the whole input:
    two series added to group b change group a's model, so a's checkpoint is left alone (it
    used to fail every rerun with a size mismatch)."""
    base = [*SMALL, "train.mode=per_group", "data.group_col=g", "model.embedding=series",
            "train.epochs=3", "train.steps_per_epoch=2", "train.checkpoint_minutes=0",
            f"train.checkpoint_dir={tmp_path}"]
    cfg = C.load(None, base)
    arrays = sines(6, groups=["a", "b"])
    (job_a, _) = plan_jobs(arrays, cfg)
    with pytest.raises(Crash):
        run_job(arrays, job_a, cfg, log=crash_at(2))
    extra = sines(8)                                  # series 6 and 7 join group b
    more = SeriesArrays.from_list([arrays.values[arrays.indptr[i]:arrays.indptr[i + 1]]
                                   for i in range(6)] +
                                  [extra.values[extra.indptr[i]:extra.indptr[i + 1]]
                                   for i in (6, 7)])
    more.groups = np.array(list(arrays.groups) + ["b", "b"], object)
    (job_a2, _) = plan_jobs(more, cfg)
    assert job_a2.series.tolist() == job_a.series.tolist()   # group a itself is unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # told apart by its key, not by a failed load
        res = run_job(more, job_a2, cfg)
    assert res.ok and res.resumed_epoch == 0 and len(res.history) == 3


# ------------------------------------------------------------------ losses in the loop

def ragged(seed=0):
    """Series of many lengths (1 to 200 steps), one constant, some random walks."""
    rng = np.random.default_rng(seed)
    vals = [rng.normal(size=n).cumsum() for n in (1, 2, 5, 24, 25, 26, 48, 200, 150, 3)]
    vals.append(np.full(60, 4.0))
    return SeriesArrays.from_list(vals)


@pytest.mark.parametrize("m", [1, 7, 24])
def test_the_loaders_mase_scale_equals_evaluates_on_the_same_histories(m, monkeypatch):
    """Vectorized over the flat arrays (in chunks of series: a tiny chunk size here), equal to
    `evaluate.mase_scale` of each series' steps before its cutoff: lag 1 for histories of m
    steps or fewer, NaN for those too short or constant."""
    import pipeline.data.scaling as S
    from pipeline.evaluation.metrics import mase_scale
    from pipeline.forecasting.predict import history
    arrays = ragged()
    rng = np.random.default_rng(m)
    cut = np.minimum(rng.integers(0, 230, len(arrays)), arrays.lengths + 5)
    cut[:3] = [0, 2, 500]
    want = mase_scale(history(arrays, np.arange(len(arrays)),
                              np.minimum(cut, arrays.lengths)), m)
    for chunk in (S.CHUNK, 64):
        monkeypatch.setattr(S, "CHUNK", chunk)
        got = S.mase_scale(arrays, cut, m)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(want).sum() >= 2 and np.isfinite(want).sum() >= 5


def test_batches_carry_the_window_scale_over_the_series_mase_scale():
    from pipeline.data.loader import loader_at
    from pipeline.data.scaling import mase_scale
    arrays = sines(4)
    cut = arrays.lengths - 30
    for scaling in ("standard", "window"):
        cfg = C.load(None, [*SMALL, "model.loss=mase", f"windows.scaling={scaling}"])
        loader = loader_at(arrays, cfg, cut)
        m_s = mase_scale(arrays, cut, 24)                     # hourly data: a day of steps
        b = loader.gather(torch.tensor([0, 1, 3, 3]), torch.tensor([0, 10, 20, 100]))
        want = b.scale.double() / torch.from_numpy(m_s)[b.series]
        torch.testing.assert_close(b.weight.double(), want, rtol=1e-6, atol=0)
        if scaling == "window":
            assert b.scale[2] != b.scale[3]                   # the window's own scale
    cfg = C.load(None, [*SMALL, "model.loss=mase", "evaluate.season=5"])
    assert torch.equal(loader_at(arrays, cfg, cut).mase_scale,
                       torch.from_numpy(mase_scale(arrays, cut, 5).astype(np.float32)))
    assert loader_at(arrays, C.load(None, SMALL), cut).gather(
        torch.tensor([0]), torch.tensor([0])).weight is None   # no mase loss: no weights


def test_the_loop_gives_mase_and_smape_the_windows_scaling():
    """pack_losses hands loc, scale and weight to the loss: MASE is then the mean of
    |ŷ − y| / m_s in original units, sMAPE is computed in original units."""
    from pipeline.data.loader import loader_at
    from pipeline.data.scaling import mase_scale
    from pipeline.models import make_loss
    from pipeline.training.jobs import new_model
    from pipeline.training.loop import pack_losses
    arrays = sines(4)
    for loss in ("mase", "smape"):
        cfg = C.load(None, [*SMALL, f"model.loss={loss}", "windows.scaling=window"])
        loader = loader_at(arrays, cfg, arrays.lengths)
        model = new_model(loader, cfg, len(arrays), 0).eval()
        b = loader.gather(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 50, 100, 200]))
        got = pack_losses(model, [b], make_loss(cfg.model), None, train=False)
        with torch.no_grad():
            pred = model(b.x, b.xf, b.static, b.idx)[..., 0].double()
        s, loc = b.scale.double()[:, None], b.loc.double()[:, None]
        y_hat, y = pred * s + loc, b.y.double() * s + loc              # original units
        if loss == "mase":
            m_s = torch.from_numpy(mase_scale(arrays, arrays.lengths, 24))[b.series][:, None]
            want = ((y_hat - y).abs() / m_s).mean()
        else:
            want = (200 * (y_hat - y).abs() / (y_hat.abs() + y.abs())).mean()
        torch.testing.assert_close(got.double(), want.reshape(1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("loss", ["mase", "smape"])
def test_mase_and_smape_train(loss):
    cfg = C.load(None, [*SMALL, "train.epochs=4", f"model.loss={loss}"])
    arrays = sines(6)
    res = run_job(arrays, plan_jobs(arrays, cfg)[0], cfg)
    assert res.ok and math.isfinite(res.best_val)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    with pytest.raises(C.ConfigError, match="model.loss = 'mape'"):
        C.load(None, ["model.loss=mape"])
