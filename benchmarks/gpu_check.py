"""Everything that needs a GPU, in one call: the GPU tests, the training benchmark and the
bare-PyTorch ceiling, then a short table of the trainer against the bare loop and the ceiling.

    python benchmarks/gpu_check.py [--ceiling PATH] [--quick]

The device machine gets the repository only, not ../shared: copy the ceiling script into an
ignored folder and carry it, e.g. `mkdir -p .gpu && cp ../shared/reference/gpu_ceiling.py .gpu/`
(`.gpu/` is in .gitignore; it is the default --ceiling when present). Needs torch, numpy,
pyarrow and PyYAML (pytest for the tests; skipped without it); not Ray, Polars or MLflow: it
drives the models and the training loop directly. --quick: tiny sizes, a CPU dry run. The last
line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CEILINGS = [os.path.join(ROOT, ".gpu", "gpu_ceiling.py"),
            os.path.join(ROOT, "..", "shared", "reference", "gpu_ceiling.py")]


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    print("$", " ".join(cmd), flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, ""
    print(r.stdout[-3000:], r.stderr[-2000:], sep="\n", flush=True)
    return r.returncode, r.stdout


def last_json(text: str) -> dict | None:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def ceiling_rows(text: str) -> list[dict]:
    """The train_step rows of gpu_ceiling.py's output (one JSON object per line)."""
    rows = []
    for ln in text.splitlines():
        if ln.startswith("{"):
            try:
                d = json.loads(ln)
            except json.JSONDecodeError:
                continue
            rows += [d] if "test" in d else d.get("results", [])
    return [r for r in rows if r.get("test") == "train_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ceiling", default=next((p for p in CEILINGS if os.path.exists(p)), None))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    py, quick = sys.executable, (["--quick"] if args.quick else [])
    try:
        import pytest  # noqa: F401
        rc_tests, _ = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py", "tests/test_models.py",
                           "tests/test_packed.py"], 300)
    except ImportError:
        rc_tests = None
        print("pytest is not installed: GPU tests skipped")
    rc_bench, out_bench = run([py, "benchmarks/train.py", "--repeats", "2", *quick], 400)
    rc_ceil, out_ceil = (run([py, args.ceiling, *quick], 300) if args.ceiling
                         else (None, ""))
    if not args.ceiling:
        print("gpu_ceiling.py not found: copy it to .gpu/ (see the docstring)")
    bench = last_json(out_bench) or {}
    ceil = {(r["model"], r["batch"], r["bf16"]): r["samples_per_s"]
            for r in ceiling_rows(out_ceil)}
    print(f"\ndevice {bench.get('device_name')}")
    print(f"{'model':<12} {'batch':>6} {'precision':>9} {'trainer':>10} {'bare':>10} "
          f"{'trainer/bare':>13} {'ceiling':>10} {'trainer/ceiling':>16}")
    table = []
    for r in bench.get("trainer", []):
        c = ceil.get((r["model"], r["batch"], r["bf16"]))
        ratio = r["trainer_samples_per_s"] / c if c else None
        table.append({**r, "ceiling_samples_per_s": c, "ratio_to_ceiling": ratio})
        print(f"{r['model']:<12} {r['batch']:>6} {'bf16' if r['bf16'] else 'fp32':>9} "
              f"{r['trainer_samples_per_s']:>10,.0f} {r['bare_samples_per_s']:>10,.0f} "
              f"{r['ratio']:>13.2f} {c or float('nan'):>10,.0f} "
              f"{ratio or float('nan'):>16.2f}")
    if bench.get("packed"):
        p = bench["packed"]
        print(f"packed per-group: {p['groups']} groups, {p['s_packed']:.2f} s packed vs "
              f"{p['s_separate_sequential']:.2f} s separate: "
              f"{p['speedup_vs_sequential']:.1f}× faster")
    print(json.dumps({"benchmark": "gpu_check", "device": bench.get("device_name"),
                      "tests_rc": rc_tests, "bench_rc": rc_bench, "ceiling_rc": rc_ceil,
                      "trainer": table, "packed": bench.get("packed")}))


if __name__ == "__main__":
    main()
