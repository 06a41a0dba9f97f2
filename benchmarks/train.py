"""Training throughput: the pipeline's trainer against a bare PyTorch loop, and packed
per-group models against separate ones.

    python benchmarks/train.py [--quick] [--device cpu|cuda] [--ray] [--only-ensemble]

Part 1 runs the same model (build_model, same initial weights) on the same data both ways:
`pipeline.training.loop.fit` (batches gathered from the flat series arrays, masked loss, gradient
clipping, logging) and a bare loop (windows gathered from a dense [S, T] tensor, Adam, L1 loss),
the shape of ../shared/reference/gpu_ceiling.py: in fp32 (TF32 allowed on CUDA for both loops,
as the ceiling does), and on CUDA also under bf16 autocast, both loops alike; then the trainer's
epoch split into its training steps and its validation (the recipe's smallest epoch, 20 steps,
and `val_max_windows: auto`; the budget: validation at most 25 % of the steps). Part 2 trains G
small per-group CNNs one after another (with --ray also as Ray tasks) and packed as one grouped
module. Part 3 trains an ensemble of 8 members packed as one module (`model.ensemble.members:
8`, one lookback, `train.pack: always`; the MLP, the CNN and the GRU) and one after another
(`train.pack: never`) against one member alone, the same steps (the goal on a GPU: 8 packed
within 1.5× one). Prints tables, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as C  # noqa: E402
from pipeline.data.loader import WindowLoader  # noqa: E402
from pipeline.data.series import SeriesArrays  # noqa: E402
from pipeline.data.windows import starts_between  # noqa: E402
from pipeline.models import build_model, make_loss  # noqa: E402
from pipeline.training.device import seed_everything  # noqa: E402
from pipeline.training.loop import TrainData, fit, val_sample  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_arrays(n_series: int, length: int, n_cov: int, seed: int = 0) -> SeriesArrays:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    vals = [np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6)) + rng.normal(0, 0.1, length)
            for _ in range(n_series)]
    arrays = SeriesArrays.from_list(vals)
    arrays.past = rng.normal(size=(len(arrays.values), n_cov)).astype(np.float32)
    arrays.past_names = [f"c{i}" for i in range(n_cov)]
    return arrays


def model_cfg(kind: str, quick: bool) -> C.ModelConfig:
    hid = 32 if quick else 128
    if kind == "gru":
        enc = C.EncoderConfig(type="gru", hidden_size=hid, num_layers=2)
    elif kind == "ffn":                 # the recipe's MLP for long series: 3 layers of 512
        enc = C.EncoderConfig(type="ffn", hidden_size=4 * hid, num_layers=3)
    else:
        enc = C.EncoderConfig(type="cnn", hidden_size=hid // 2, num_layers=6, residual=False)
    return C.ModelConfig(encoder=enc, decoder=C.DecoderConfig(hidden_size=256, num_layers=1))


def bare_loop(model, arrays, L, H, batch, steps, device, bf16=False) -> float:
    """gpu_ceiling.py's loop: dense [S, T] tensors on the device, random windows, Adam."""
    S, T = len(arrays), int(arrays.lengths[0])
    y = torch.from_numpy(arrays.values.reshape(S, T)).to(device)             # [S, T]
    cov = torch.from_numpy(arrays.past.reshape(S, T, -1)).to(device)         # [S, T, C]
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    ar = torch.arange(L + H, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        sid = torch.randint(0, S, (batch, 1), device=device, generator=g)
        idx = torch.randint(0, T - L - H + 1, (batch, 1), device=device, generator=g) + ar
        w = y[sid, idx]                                                      # [B, L + H]
        x = torch.cat([w[:, :L, None], cov[sid, idx[:, :L]]], -1)            # [B, L, 1 + C]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)[..., 0].float()
        F.l1_loss(pred, w[:, L:]).backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def trainer_loop(model, arrays, L, H, batch, steps, device, mcfg, bf16=False) -> float:
    lens = arrays.lengths
    index = starts_between(np.zeros(len(lens)), lens - L - H)
    loader = WindowLoader(arrays, L, H, np.zeros(len(lens)), np.ones(len(lens)), device=device)
    data = TrainData(loader, index, None)
    precision = "bf16" if bf16 else "fp32"
    warm = C.TrainConfig(epochs=1, steps_per_epoch=3, batch_size=batch, device=str(device),
                         precision=precision, checkpoint_minutes=None)
    fit(model, [data], warm, make_loss(mcfg), progress=False)
    cfg = C.TrainConfig(epochs=1, steps_per_epoch=steps, batch_size=batch, device=str(device),
                        precision=precision, checkpoint_minutes=None)
    sync(device)
    t0 = time.perf_counter()
    fit(model, [data], cfg, make_loss(mcfg), progress=False)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def validation_cost(model, arrays, L, H, batch, steps, device, mcfg) -> dict:
    """One epoch of `steps` steps with validation (the last H windows of each series held
    out, `val_max_windows: auto`), after one to warm up: its training and validation
    seconds."""
    lens = arrays.lengths
    train = starts_between(np.zeros(len(lens)), lens - L - 2 * H)
    val = starts_between(lens - L - 2 * H + 1, lens - L - H)
    loader = WindowLoader(arrays, L, H, np.zeros(len(lens)), np.ones(len(lens)), device=device)
    cfg = C.TrainConfig(epochs=1, steps_per_epoch=steps, batch_size=batch, device=str(device),
                        checkpoint_minutes=None)
    for _ in range(2):                      # the first warms up
        (res,) = fit(model, [TrainData(loader, train, val)], cfg, make_loss(mcfg),
                     progress=False)
    n_val = len(val_sample(val, cfg, steps * batch))
    return {"val_windows": n_val, "train_windows": steps * batch,
            "s_train_steps": res.train_seconds, "s_validation": res.val_seconds,
            "val_over_train": res.val_seconds / res.train_seconds}


def part_trainer(args, device) -> list[dict]:
    L, H, C_ = (48, 12, 3) if args.quick else (168, 48, 3)
    batch = 64 if args.quick else (256 if device.type == "cpu" else 4096)
    steps = 5 if args.quick else (10 if device.type == "cpu" else 50)
    arrays = make_arrays(64 if args.quick else 512, L + H + 200, C_)
    rows = []
    for kind, bf16 in [(k, p) for p in ((False, True) if device.type == "cuda" else (False,))
                       for k in ("gru", "cnn")]:
        mcfg = model_cfg(kind, args.quick)
        build = dict(lookback=L, horizon=H, past_size=C_, future_size=0)
        bare, ours = 0.0, 0.0
        for _ in range(args.repeats):  # alternate and keep the best: noise hits both alike
            seed_everything(0)
            bare = max(bare, bare_loop(build_model(mcfg, **build).to(device), arrays, L, H,
                                       batch, steps, device, bf16))
            seed_everything(0)
            ours = max(ours, trainer_loop(build_model(mcfg, **build).to(device), arrays, L, H,
                                          batch, steps, device, mcfg, bf16))
        seed_everything(0)
        cost = validation_cost(build_model(mcfg, **build).to(device), arrays, L, H, batch,
                               5 if args.quick else 20 if device.type == "cpu" else 50,
                               device, mcfg)
        rows.append({"model": f"{kind}_direct", "batch": batch, "bf16": bf16,
                     "bare_samples_per_s": bare, "trainer_samples_per_s": ours,
                     "ratio": ours / bare, **cost})
    return rows


def part_packed(args, device) -> dict:
    from pipeline.training.jobs import run_job, run_pack
    from pipeline.training.plan import plan_jobs
    G = 8 if args.quick else 64
    arrays = make_arrays(G * 2, 300, 0, seed=1)
    arrays.past, arrays.past_names = None, []
    arrays.groups = np.array([f"g{i // 2:03d}" for i in range(len(arrays))], object)
    steps = 3 if args.quick else 10
    cfg = C.load(None, [
        "data.group_col=g", "train.mode=per_group", "data.calendar=[]", "windows.lookback=168",
        "windows.horizon=48", "windows.val_size=0", "model.encoder.type=cnn",
        "model.encoder.hidden_size=16", "model.encoder.num_layers=4",
        "model.encoder.residual=false", "model.decoder.hidden_size=32",
        f"train.steps_per_epoch={steps}", "train.epochs=1", "train.batch_size=64",
        f"train.device={device}"])
    jobs = plan_jobs(arrays, cfg)
    t0 = time.perf_counter()
    for job in jobs:
        run_job(arrays, job, cfg)
    sync(device)
    t_seq = time.perf_counter() - t0
    packed_cfg = C.load(None, [*_overrides(cfg), "train.per_group.packed=true",
                               "train.pack=always"])
    run_pack(arrays, jobs[:2], packed_cfg)  # warm-up
    t0 = time.perf_counter()
    res = run_pack(arrays, jobs, packed_cfg)
    sync(device)
    t_packed = time.perf_counter() - t0
    assert all(r.ok for r in res)
    out = {"groups": G, "steps": steps, "batch": 64, "s_separate_sequential": t_seq,
           "s_packed": t_packed, "speedup_vs_sequential": t_seq / t_packed}
    if args.ray:
        from pipeline.execution.ray_train import (
            train as on_ray,  # Ray only here: the GPU check has none
        )
        t0 = time.perf_counter()
        on_ray(arrays, [[j] for j in jobs], cfg)
        out["s_separate_ray_tasks"] = time.perf_counter() - t0  # includes Ray start
        out["speedup_vs_ray_tasks"] = out["s_separate_ray_tasks"] / t_packed
    return out


def part_ensemble(args, device) -> list[dict]:
    """One member alone against 8 packed (one lookback): the same data, steps and batch."""
    from pipeline.training.jobs import run_job
    from pipeline.training.plan import plan_jobs
    members = 8
    steps = 3 if args.quick else (10 if device.type == "cpu" else 50)
    batch = 64 if args.quick else (256 if device.type == "cpu" else 4096)
    L, H = (48, 12) if args.quick else (168, 48)
    arrays = make_arrays(64 if args.quick else 512, L + H + 200, 0, seed=2)
    arrays.past, arrays.past_names = None, []
    rows = []
    for kind in ("ffn", "cnn", "gru"):
        mcfg = model_cfg(kind, args.quick)
        enc = [f"model.encoder.{k}={json.dumps(v)}" for k, v in vars(mcfg.encoder).items()
               if k in ("type", "hidden_size", "num_layers", "residual")]
        base = ["data.calendar=[]", f"windows.lookback={L}", f"windows.horizon={H}",
                "windows.val_size=0", *enc, f"model.decoder.hidden_size={mcfg.decoder.hidden_size}",
                f"train.steps_per_epoch={steps}", "train.epochs=1", f"train.batch_size={batch}",
                f"train.device={device}", "train.checkpoint_minutes=null"]
        seconds = {}
        for n, pack in ((1, "auto"), (members, "always"), (-members, "never")):
            cfg = C.load(None, [*base, f"model.ensemble.members={abs(n)}", f"train.pack={pack}"])
            (job,) = plan_jobs(arrays, cfg)
            best = float("inf")
            for _ in range(1 + args.repeats):       # the first is a warm-up
                sync(device)
                t0 = time.perf_counter()
                res = run_job(arrays, job, cfg)
                sync(device)
                best = min(best, time.perf_counter() - t0)
                assert res.ok, res.error
            seconds[n] = best
        rows.append({"model": f"{kind}_direct", "members": members, "steps": steps,
                     "batch": batch, "s_one_member": seconds[1],
                     "s_packed_ensemble": seconds[members],
                     "s_one_after_another": seconds[-members],
                     "ratio": seconds[members] / seconds[1],
                     "ratio_one_after_another": seconds[-members] / seconds[1]})
    return rows


def _overrides(cfg: C.Config) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in cfg.flat().items()
            if k.split(".")[0] in ("data", "windows", "model", "train") and v is not None
            and k != "model.name"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ray", action="store_true", help="also time separate groups as Ray tasks")
    ap.add_argument("--skip-packed", action="store_true")
    ap.add_argument("--skip-ensemble", action="store_true")
    ap.add_argument("--only-ensemble", action="store_true", help="part 3 alone")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True   # both loops, as in gpu_ceiling.py
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    rows = [] if args.only_ensemble else part_trainer(args, device)
    if rows:
        print(f"\n{'model':<12} {'batch':>6} {'precision':>9} {'bare samples/s':>15} "
              f"{'trainer samples/s':>18} {'ratio':>6} {'steps s':>8} {'val s':>6} "
              f"{'val windows':>11} {'val/steps':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['batch']:>6} {'bf16' if r['bf16'] else 'fp32':>9} "
              f"{r['bare_samples_per_s']:>15,.0f} {r['trainer_samples_per_s']:>18,.0f} "
              f"{r['ratio']:>6.2f} {r['s_train_steps']:>8.2f} {r['s_validation']:>6.2f} "
              f"{r['val_windows']:>11,} {r['val_over_train']:>9.0%}")
    packed = None if args.skip_packed or args.only_ensemble else part_packed(args, device)
    if packed:
        print(f"\nper-group CNNs: {packed['groups']} groups × {packed['steps']} steps × batch "
              f"{packed['batch']}")
        print(f"  separate, one after another  {packed['s_separate_sequential']:8.2f} s")
        if "s_separate_ray_tasks" in packed:
            print(f"  separate, Ray tasks          {packed['s_separate_ray_tasks']:8.2f} s")
        print(f"  packed, one module           {packed['s_packed']:8.2f} s   "
              f"speed-up {packed['speedup_vs_sequential']:.1f}×")
    ensemble = None if args.skip_ensemble else part_ensemble(args, device)
    if ensemble:
        e = ensemble[0]
        print(f"\nensemble of {e['members']} (packed, one after another) against one member: "
              f"{e['steps']} steps × batch {e['batch']}")
        print(f"  {'model':<12} {'one member s':>13} {'8 packed s':>11} {'ratio':>6} "
              f"{'8 one after another s':>22} {'ratio':>6}")
        for e in ensemble:
            print(f"  {e['model']:<12} {e['s_one_member']:>13.2f} {e['s_packed_ensemble']:>11.2f}"
                  f" {e['ratio']:>6.2f} {e['s_one_after_another']:>22.2f}"
                  f" {e['ratio_one_after_another']:>6.2f}")
    print(json.dumps({"benchmark": "train", "device": str(device), "device_name": name,
                      "machine": platform.node(), "torch": torch.__version__,
                      "trainer": rows, "packed": packed, "ensemble": ensemble}))


if __name__ == "__main__":
    main()
