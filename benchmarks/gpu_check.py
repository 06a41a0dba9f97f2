"""Everything that needs a GPU, in one call: the GPU tests, the training benchmark and the
bare-PyTorch ceiling, then a short table of the trainer as a ratio to the ceiling.

    python benchmarks/gpu_check.py [--ceiling ../shared/reference/gpu_ceiling.py]

Needs torch, numpy, pyarrow and PyYAML (pytest for the tests; they are skipped without it);
not Ray, Polars or MLflow: it drives the models and the training loop directly. The last line
is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    rows = []
    for ln in text.splitlines():
        if ln.startswith("{"):
            d = json.loads(ln)
            if d.get("test") == "train_step":
                rows.append(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ceiling", default=os.path.join(ROOT, "..", "shared", "reference",
                                                      "gpu_ceiling.py"))
    args = ap.parse_args()
    py = sys.executable
    try:
        import pytest  # noqa: F401
        rc_tests, _ = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py", "tests/test_models.py",
                           "tests/test_packed.py"], 300)
    except ImportError:
        rc_tests = None
        print("pytest is not installed: GPU tests skipped")
    rc_bench, out_bench = run([py, "benchmarks/train.py", "--repeats", "2"], 300)
    rc_ceil, out_ceil = run([py, args.ceiling], 300)
    bench = last_json(out_bench) or {}
    ceil = {(r["model"], r["batch"], r["bf16"]): r["samples_per_s"] for r in ceiling_rows(out_ceil)}
    print(f"\n{'model':<12} {'batch':>6} {'trainer':>10} {'bare':>10} {'ceiling fp32':>13} "
          f"{'trainer/ceiling':>16}")
    table = []
    for r in bench.get("trainer", []):
        c = ceil.get((r["model"], r["batch"], False))
        ratio = r["trainer_samples_per_s"] / c if c else None
        table.append({**r, "ceiling_samples_per_s": c, "ratio_to_ceiling": ratio})
        print(f"{r['model']:<12} {r['batch']:>6} {r['trainer_samples_per_s']:>10,.0f} "
              f"{r['bare_samples_per_s']:>10,.0f} {c or float('nan'):>13,.0f} "
              f"{ratio or float('nan'):>16.2f}")
    if bench.get("packed"):
        p = bench["packed"]
        print(f"packed per-group: {p['groups']} groups, {p['speedup_vs_sequential']:.1f}× "
              "faster than one after another")
    print(json.dumps({"benchmark": "gpu_check", "device": bench.get("device_name"),
                      "tests_rc": rc_tests, "bench_rc": rc_bench, "ceiling_rc": rc_ceil,
                      "trainer": table, "packed": bench.get("packed")}))


if __name__ == "__main__":
    main()
