"""Ensembles (model.ensemble): members of one lookback trained as one pack, each equal to the
member trained alone; forecasts combined per series, step and quantile over the members that
can forecast; one weights-only model file."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import SMALL, sines, weights

import pipeline.training.jobs as J
import pipeline.training.loop as T
from pipeline import config as C
from pipeline.data.loader import loader_at
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import cutoff_positions
from pipeline.forecasting.backtest import backtest
from pipeline.forecasting.final import final_forecast
from pipeline.forecasting.predict import predict_job
from pipeline.models import EncoderDecoder, Ensemble, load_model, save_model
from pipeline.models.ensemble import Member, ensemble_members, lookback_packs, member_config
from pipeline.training.device import seed_everything
from pipeline.training.jobs import new_model, run_job
from pipeline.training.plan import plan_jobs
from pipeline.training.results import save_result, state_bytes

# horizon 12: lookbacks [1, 2, 4] horizons are 12, 24 and 48 steps
BASE = [*SMALL, "model.encoder.type=cnn", "windows.lookback=24", "train.epochs=2",
        "train.steps_per_epoch=3"]


def alone(member: dict, extra=()) -> C.Config:
    """The config member `member` trains with when it is not in an ensemble."""
    return C.load(None, [*BASE, *extra, f"windows.lookback={member['lookback']}",
                         f"model.loss={member['loss']}", f"train.seed={member['seed']}"])


FFN = ["model.encoder.type=ffn", "model.encoder.hidden_size=16"]


@pytest.mark.parametrize("ensemble,arch", [
    (["model.ensemble.members=4", "model.ensemble.lookbacks=[1, 2]",
      "model.ensemble.losses=[mae, mase]"], []),               # two packs, each of two losses
    (["model.ensemble.members=3", "model.ensemble.losses=[smape]"], []),  # one pack, one loss
    (["model.ensemble.members=4", "model.ensemble.lookbacks=[1, 4]",
      "model.ensemble.losses=[mase, smape]"], FFN),            # the recipe's MLP for long series
], ids=["cnn-two-packs", "cnn-one-pack", "ffn-two-packs"])
@pytest.mark.parametrize("pack", ["always", "never"])
def test_a_packed_ensemble_equals_its_members_trained_alone(ensemble, arch, pack, monkeypatch):
    """train.pack: always trains a lookback's members as one pack, never one after another
    (with the pack's steps); either way each member equals the member trained alone."""
    arrays = sines(6, length=260)
    cfg = C.load(None, [*BASE, *arch, *ensemble, f"train.pack={pack}"])
    packs, real_fit = [], T.fit

    def spy(model, data, *a, **k):
        packs.append((len(data), {d.loader.L for d in data}))
        return real_fit(model, data, *a, **k)
    monkeypatch.setattr(J, "fit", spy)
    (job,) = plan_jobs(arrays, cfg)
    res = run_job(arrays, job, cfg)
    monkeypatch.setattr(J, "fit", real_fit)
    assert res.ok and isinstance(res.model(), Ensemble)
    want = [(len(p), {m.lookback for m in p}) for p in lookback_packs(ensemble_members(cfg))]
    if pack == "never":
        want = [(1, lb) for g, lb in want for _ in range(g)]
    assert packs == want and all(g > 1 for g, _ in packs) == (pack == "always")
    ens_state = weights(res.state)
    for row in res.members:
        solo = run_job(arrays, job, alone(row, arch))
        assert row["ok"] and row["best_epoch"] == solo.best_epoch
        assert row["best_val"] == pytest.approx(solo.best_val, rel=1e-4)
        prefix = f"members.{row['index']}."
        mine = {k[len(prefix):]: v for k, v in ens_state.items() if k.startswith(prefix)}
        theirs = weights(solo.state)
        assert mine.keys() == theirs.keys()
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5,
                                       msg=f"member {row['index']}: {k}")
    assert res.members[0]["loss"] == cfg.model.member_losses()[0]
    assert res.best_val == res.members[0]["best_val"]       # the job's figures: member 0's


def test_the_mlp_members_one_after_another_equal_their_pack_bit_for_bit():
    """The recipe's MLP members trained one after another (train.pack: never, what auto does
    on a CPU) give the pack's weights and history bit for bit: batched matmuls compute each
    member's slice as the member alone does, and a member alone is clipped with its pack's
    arithmetic. (CNN and GRU members match their pack to float rounding: the test above.)"""
    arrays = sines(6, length=260)
    ens = ["model.ensemble.members=4", "model.ensemble.lookbacks=[1, 4]",
           "model.ensemble.losses=[mase, smape]", "train.grad_clip=0.05"]
    res = {}
    for pack in ("always", "never"):
        cfg = C.load(None, [*BASE, *FFN, *ens, f"train.pack={pack}"])
        (job,) = plan_jobs(arrays, cfg)
        res[pack] = run_job(arrays, job, cfg)
    a, b = weights(res["always"].state), weights(res["never"].state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["best_val"] for m in res["always"].members] == \
        [m["best_val"] for m in res["never"].members]


def test_one_member_is_no_ensemble_bit_for_bit():
    arrays = sines(4, length=200)
    plain = C.load(None, BASE)
    one = C.load(None, [*BASE, "model.ensemble.members=1", "model.ensemble.combine=mean"])
    (job,) = plan_jobs(arrays, plain)
    a, b = run_job(arrays, job, plain), run_job(arrays, job, one)
    assert a.spec == b.spec and b.members == [] and isinstance(b.model(), EncoderDecoder)
    wa, wb = weights(a.state), weights(b.state)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    fa = final_forecast(arrays, [job], {"global": a.model()}, plain)
    fb = final_forecast(arrays, [job], {"global": b.model()}, one)
    assert np.array_equal(fa["y_hat"], fb["y_hat"])


def ragged_sines():
    """Series of 10 to 260 steps: a 48-step lookback cannot forecast the short ones, no member
    the 10-step one."""
    full = sines(7, length=260)
    cut = [260, 260, 200, 120, 55, 30, 10]
    return SeriesArrays.from_list([full.values[full.indptr[i]:full.indptr[i] + n]
                                   for i, n in enumerate(cut)])


def random_members(arrays, cfg, lookbacks):
    """Untrained members (seeded), member i reading lookbacks[i] steps."""
    out = []
    for i, lb in enumerate(lookbacks):
        mcfg = member_config(cfg, Member(i, lb, cfg.model.loss, cfg.train.seed + i))
        seed_everything(i)
        out.append(new_model(loader_at(arrays, mcfg, arrays.lengths), mcfg, len(arrays), 0))
    return out


@pytest.mark.parametrize("how", ["median", "mean"])
@pytest.mark.parametrize("quantiles", [False, True])
@pytest.mark.parametrize("with_target", [True, False])
def test_the_ensemble_forecast_is_the_median_or_mean_of_its_members(how, quantiles,
                                                                    with_target):
    """Exactly np.median / np.mean of the members' own forecasts (each predicted alone with its
    lookback), per series, step and quantile, over the members that can forecast the series;
    a series none can forecast is left out."""
    arrays = ragged_sines()
    extra = ["model.loss=quantile", "model.quantiles=[0.1, 0.5, 0.9]"] if quantiles else []
    cfg = C.load(None, [*BASE, *extra])
    lookbacks = [12, 24, 48, 24]
    ens = Ensemble(random_members(arrays, cfg, lookbacks), how)
    cut = cutoff_positions(arrays.lengths, 12, 1, 12)[0] if with_target else arrays.lengths
    every = np.ones(len(arrays), bool)
    q = cfg.model.quantiles
    p = predict_job(ens, arrays, cfg, cut, every, quantiles=q, with_target=with_target)
    alone_p = [predict_job(m, arrays, member_config(cfg, Member(i, lb, cfg.model.loss, 0)),
                           cut, every, quantiles=q, with_target=with_target)
               for i, (m, lb) in enumerate(zip(ens.members, lookbacks, strict=True))]
    fn = np.median if how == "median" else np.mean
    assert list(p.series) == list(range(6))        # the 10-step series: no member's window
    for row, s in enumerate(p.series):
        covering = [a for a in alone_p if s in a.series]
        assert len(covering) == (4 if cut[s] >= 48 else 3 if cut[s] >= 24 else 1)
        got = p.q_hat[row] if quantiles else p.y_hat[row]
        each = [(a.q_hat if quantiles else a.y_hat)[list(a.series).index(s)] for a in covering]
        assert np.array_equal(got, fn(np.stack(each), 0))
    assert np.array_equal(p.origin, cut[p.series])
    if with_target:
        assert np.allclose(p.y, alone_p[0].y[np.searchsorted(alone_p[0].series, p.series)],
                           rtol=1e-5)


def test_with_padding_every_member_forecasts_the_short_series():
    arrays = ragged_sines()
    cfg = C.load(None, [*BASE, "windows.min_length=30"])
    ens = Ensemble(random_members(arrays, cfg, [12, 48]), "mean")
    p = predict_job(ens, arrays, cfg, arrays.lengths, np.ones(len(arrays), bool),
                    with_target=False)
    assert list(p.series) == list(range(len(arrays))) and np.isfinite(p.y_hat).all()


def test_an_ensemble_saves_and_loads_bit_exactly_weights_only(tmp_path):
    arrays = sines(3, length=200)
    cfg = C.load(None, BASE)
    ens = Ensemble(random_members(arrays, cfg, [12, 24, 48]), "mean")
    path = tmp_path / "ens.pt"
    save_model(ens, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 2 and raw["combine"] == "mean" and len(raw["ensemble"]) == 3
    assert [e["spec"]["lookback"] for e in raw["ensemble"]] == [12, 24, 48]
    back = load_model(path)
    assert isinstance(back, Ensemble) and not back.training
    assert back.lookbacks == [12, 24, 48] and back.combine == "mean" and back.spec == ens.spec
    a, b = ens.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    every = np.ones(len(arrays), bool)
    pa = predict_job(ens, arrays, cfg, arrays.lengths, every, with_target=False)
    pb = predict_job(back, arrays, cfg, arrays.lengths, every, with_target=False)
    assert np.array_equal(pa.y_hat, pb.y_hat)
    single = ens.members[0]                      # format 1, as every earlier file was written
    torch.save({"format": 1, "spec": single.spec, "state_dict": single.state_dict()},
               tmp_path / "one.pt")
    one = load_model(tmp_path / "one.pt")
    assert isinstance(one, EncoderDecoder) and all(
        torch.equal(v, single.state_dict()[k]) for k, v in one.state_dict().items())
    torch.save({"format": 9}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="unknown model file format 9"):
        load_model(tmp_path / "future.pt")


def test_the_ensembles_forward_reads_each_members_lookback():
    """`forward` on a batch of the longest lookback (the MLflow flavor's input): under
    per-series scaling it is the combined forecast, in the model's units."""
    arrays = sines(3, length=200)
    cfg = C.load(None, BASE)
    ens = Ensemble(random_members(arrays, cfg, [12, 48, 24]), "median").eval()
    loader = loader_at(arrays, cfg, arrays.lengths).with_lookback(48)
    b = loader.gather(torch.tensor([0, 1, 2]), torch.tensor([10, 20, 30]))
    with torch.no_grad():
        out = ens(b.x, b.xf, b.static, b.idx)
        each = torch.stack([m(b.x[:, -lb:]) for m, lb in zip(ens.members, ens.lookbacks,
                                                            strict=True)])
    assert out.shape == (3, 12, 1) and torch.equal(out, each.median(0).values)
    assert ens.spec["lookback"] == 48 and len(ens.spec["ensemble"]) == 3


def test_an_ensemble_job_backtests_and_forecasts(tmp_path):
    arrays = sines(5, length=260, groups=["a", "b"])
    cfg = C.load(None, [*BASE, "model.ensemble.members=3", "model.ensemble.lookbacks=[1, 4]",
                        "train.mode=per_group", "data.group_col=g", "train.per_group.packed=true",
                        "windows.n_windows=2"])
    results = J.run_jobs_locally(arrays, plan_jobs(arrays, cfg), cfg)
    assert all(r.ok and [m["lookback"] for m in r.members] == [12, 48, 12] for r in results)
    models = {r.name: r.model() for r in results}
    bt = backtest(arrays, plan_jobs(arrays, cfg), models, cfg)
    summary = bt.summary()
    assert np.isfinite(summary[cfg.model.name]["mae"])
    n_model = sum(len(f["y_hat"]) for f in bt.frames if f["model"][0] == cfg.model.name)
    n_naive = sum(len(f["y_hat"]) for f in bt.frames if f["model"][0] == "naive")
    assert n_model == n_naive == 5 * 2 * 12              # every series, cutoff and step
    cols = final_forecast(arrays, plan_jobs(arrays, cfg), models, cfg)
    assert set(cols["model"]) == {cfg.model.name} and np.isfinite(cols["y_hat"]).all()
    save_result(results[0], str(tmp_path / "ens.pt"))
    assert isinstance(load_model(tmp_path / "ens.pt"), Ensemble)


def test_an_ensemble_resumes_from_its_checkpoints_bit_identical(tmp_path, monkeypatch):
    """Killed in the second lookback's pack: run again, the first pack resumes from its last
    checkpoint and the second from its own; every member ends as in a run that never stopped."""
    arrays = sines(4, length=260)
    base = [*BASE, "train.epochs=4", "model.ensemble.members=4",
            "model.ensemble.lookbacks=[1, 2]", "train.scheduler=cosine", "train.pack=always"]
    cfg = C.load(None, [*base, "train.checkpoint_minutes=0", f"train.checkpoint_dir={tmp_path}"])
    (job,) = plan_jobs(arrays, cfg)
    clean = run_job(arrays, job, C.load(None, [*base, "train.checkpoint_minutes=null"]))
    real, calls = T.validate, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 7:                   # the second pack's epoch 2
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(T, "validate", dies)
    with pytest.raises(RuntimeError, match="killed"):
        run_job(arrays, job, cfg)
    monkeypatch.setattr(T, "validate", real)
    assert len(list(tmp_path.rglob("*.ckpt"))) == 2
    resumed = run_job(arrays, job, cfg)
    assert resumed.attempts == 2 and resumed.resumed_epoch == 3
    a, b = weights(clean.state), weights(resumed.state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_warm_start_gives_each_member_its_own_weights():
    arrays = sines(3, length=200)
    cfg = C.load(None, BASE)
    ens_cfg = C.load(None, [*BASE, "model.ensemble.members=2", "model.ensemble.lookbacks=[2, 4]",
                            "train.epochs=1"])
    (job,) = plan_jobs(arrays, ens_cfg)
    trained = run_job(arrays, job, ens_cfg)
    assert J.model_spec(arrays, ens_cfg) == trained.spec    # what a champion must match
    assert J.model_spec(arrays, cfg) == run_job(arrays, job, cfg).spec
    ens = Ensemble(random_members(arrays, cfg, [24, 24]), "median")
    init = state_bytes(ens)
    m1 = J._member_init(init, Member(1, 24, "mae", 1), ensemble=True)
    assert all(torch.equal(v, ens.members[1].state_dict()[k]) for k, v in m1.items())
    single = state_bytes(ens.members[0])
    assert J._member_init(single, Member(0, 24, "mae", 0), ensemble=True) is not None
    assert J._member_init(single, Member(1, 24, "mae", 1), ensemble=True) is None


def test_the_ensemble_config_is_checked():
    for arch in (["model.encoder.type=lstm"], ["model.decoder.type=gru"],
                 ["model.encoder.type=gru", "model.encoder.bidirectional=true"]):
        with pytest.raises(C.ConfigError, match="model.ensemble.members = 3: packed models"):
            C.load(None, [*arch, "model.ensemble.members=3"])
        C.load(None, [*arch, "model.ensemble.members=1"])         # no ensemble: any model
    with pytest.raises(C.ConfigError, match="model.ensemble.losses"):
        C.load(None, ["model.ensemble.members=2", "model.ensemble.losses=[mae, quantile]"])
    with pytest.raises(C.ConfigError, match="model.ensemble.combine = 'mode'"):
        C.load(None, ["model.ensemble.combine=mode"])
    with pytest.raises(C.ConfigError, match=r"model.ensemble.lookbacks\[1\] = 0"):
        C.load(None, ["model.ensemble.lookbacks=[1, 0]"])
    cfg = C.load(None, [*BASE, "model.ensemble.members=5", "model.ensemble.lookbacks=[2, 1]",
                        "model.ensemble.losses=[mae, smape]", "train.seed=7"])
    assert ensemble_members(cfg) == [Member(0, 24, "mae", 7), Member(1, 12, "mae", 8),
                                     Member(2, 24, "smape", 9), Member(3, 12, "smape", 10),
                                     Member(4, 24, "mae", 11)]
    assert member_config(cfg, ensemble_members(cfg)[0]).windows.lookback == 24
    m3 = member_config(cfg, ensemble_members(cfg)[3])
    assert (m3.windows.lookback, m3.model.loss, m3.train.seed) == (12, "smape", 10)
    assert dataclasses.asdict(cfg)["model"]["ensemble"]["members"] == 5


def test_a_cnn_member_of_a_shorter_lookback_keeps_the_layers_it_needs():
    cfg = C.load(None, ["windows.horizon=48", "windows.lookback=336", "model.encoder.type=cnn",
                        "model.encoder.num_layers=8", "model.ensemble.members=3",
                        "model.ensemble.lookbacks=[7, 5, 2]"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no receptive-field warning per member
        layers = [member_config(cfg, m).model.encoder.num_layers for m in ensemble_members(cfg)]
    assert layers == [8, 7, 6]                         # fields 511 ≥ 336, 255 ≥ 240, 127 ≥ 96
    gru = C.load(None, ["windows.horizon=48", "windows.lookback=336", "model.ensemble.members=2",
                        "model.ensemble.lookbacks=[7, 2]"])
    assert member_config(gru, ensemble_members(gru)[1]).model.encoder.num_layers == 2
