"""README's commands run as written: every `python -m pipeline …` and `python -m flows.…` line of
its code blocks, in order, in a fresh folder holding the configs, after `make run`'s own
command — with short training settings appended (the same commands, faster). Optional parts in
brackets are left out; `make`, `mlflow ui`, benchmarks and docker lines are not run here."""
from __future__ import annotations

import importlib
import pathlib
import re
import shlex
import shutil

import pytest

from pipeline.cli import main as pipeline_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
         "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
         "evaluate.plots=1", "--set", "evaluate.comparators=[]", "--set", "ray.enabled=false"]
TRAINS = {"train", "backtest", "forecast", "run", "flows.nightly", "flows.backtest",
          "flows.run", "flows.forecast"}


def readme_commands() -> list[list[str]]:
    """The argv of each command line in README's code blocks (comments and optional
    [bracketed] parts removed, `$ ` prompts dropped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if not line.startswith(("python -m pipeline", "python -m flows")):
                continue
            line = re.sub(r"\s+#.*$", "", line)
            line = re.sub(r"\[[^\]]*\]", "", line)
            argv = shlex.split(line)[2:]                # after `python -m`
            out.append(argv[1:] if argv[0] == "pipeline" else argv)
    return out


def run(argv: list[str], tmp: pathlib.Path) -> int:
    argv = [a.replace("/tmp/t2", str(tmp / "t2")) for a in argv]
    name = argv[0]
    if name.startswith("flows."):
        flow = importlib.import_module(name)
        fn = getattr(flow, name.split(".")[1])
        extra = SHORT if name in TRAINS else SHORT[-2:]
        return flow.main(fn, [*argv[1:], *extra], registry=getattr(flow, "REGISTRY", False))
    extra = SHORT if name in TRAINS else (SHORT[-2:] if name == "prepare" else [])
    if name == "tune":      # trials run on Ray Tune: Ray stays on; the space sets the lookback
        extra = [a for i in range(0, len(SHORT) - 2, 2) for a in SHORT[i:i + 2]
                 if "windows.lookback" not in SHORT[i + 1]] + ["--trials", "2"]
    return pipeline_main([*argv, *extra])


def test_the_readme_shows_the_commands_this_test_runs():
    names = [c[0] for c in readme_commands()]
    assert {"make-demo-data", "prepare", "train", "run", "compare", "forecast",
            "flows.nightly", "tune"} <= set(names)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert pipeline_main(["make-demo-data", "--out", "data/demo", "--series", "24"]) == 0
    assert run(["run", "--config", "configs/demo.yaml"], tmp_path) == 0      # `make run`
    for argv in readme_commands():
        if argv[0] == "make-demo-data":
            argv = [*argv, "--series", "24"]                                # keep it small
        code = run(argv, tmp_path)
        printed = capsys.readouterr()
        assert code == 0, (argv, printed.err[-2000:])
