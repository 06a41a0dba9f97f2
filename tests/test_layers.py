"""Architecture invariants: the rooms of pipeline/ and what each may import (`ROOMS`), Ray only
in the execution room, MLflow and its clients only in the tracking room, the models, windows
and training loop importable without Ray, MLflow or Polars, the config importing nothing else
of the project, and only the CLI importing the flows."""
import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK = """
import builtins
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split('.')[0] in ('ray', 'mlflow', 'polars'):
        raise ImportError('blocked: ' + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import pipeline.models, pipeline.models.packed, pipeline.training.loop, pipeline.training.jobs
import pipeline.data.windows, pipeline.data.loader, pipeline.data.scaling, pipeline.config
import pipeline.training.checkpoint, pipeline.forecasting.predict, pipeline.evaluation.metrics
print('ok')
"""


def test_core_imports_without_ray_mlflow_or_polars():
    r = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def imports_of(module: str, where: str = "pipeline") -> list[str]:
    pattern = re.compile(rf"^\s*(import|from)\s+{module}\b", re.M)
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / where).rglob("*.py")
                  if pattern.search(p.read_text()))


def test_ray_is_imported_only_by_the_execution_room():
    assert imports_of("ray") and all(p.startswith("pipeline/execution/")
                                     for p in imports_of("ray"))


def test_mlflow_and_its_clients_are_used_only_by_the_tracking_room():
    assert imports_of("mlflow") and all(p.startswith("pipeline/tracking/")
                                        for p in imports_of("mlflow"))
    client = re.compile(r"MlflowClient|tracking\.client\b|\bclient\(")
    users = [str(p.relative_to(ROOT)) for where in ("pipeline", "flows")
             for p in (ROOT / where).rglob("*.py") if client.search(p.read_text())]
    assert users and all(p.startswith("pipeline/tracking/") for p in users)


# Each room of pipeline/ (a package, or a module of the base) and what of the project it may
# import besides itself: the layering, from the configuration up to the command line.
BASE = {"errors", "names", "secrets", "progress", "provenance", "paths"}
ROOMS = {
    "config": set(),
    "secrets": set(), "progress": set(), "provenance": set(),
    "errors": {"config", "secrets"},
    "names": {"errors"},
    "models": {"config"},
    "paths": {"config"},
    "data": {"config", "errors", "names", "paths", "progress", "secrets"},
    "evaluation": {"config", "errors"},
    "hierarchy": {"config", "errors"},
    "training": {"config", "data", "models", *BASE},
    "forecasting": {"config", "data", "evaluation", "models", "training"},
    "tuning": {"config", "data", "errors", "training"},
    "tracking": {"config", "data", "evaluation", "forecasting", "models", *BASE},
    "outputs": {"config", "data", "evaluation", "forecasting", "training", *BASE},
    "execution": {"config", "models", "training", "tuning", *BASE},
    "stages": {"config", "data", "models", "training", "forecasting", "evaluation", "outputs",
               "tracking", "tuning", "execution", "hierarchy", *BASE},
    "cli": {"config", "data", "stages", "outputs", "tracking", *BASE},
    "__main__": {"cli"},
}


def _room(module: str) -> str:
    return module.split(".")[1]


def test_each_room_imports_only_the_rooms_below_it():
    """Every `pipeline` import (module level and in functions) of every file, by room."""
    bad = []
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = p.relative_to(ROOT / "pipeline").parts
        if rel == ("__init__.py",):
            continue
        mine = rel[0].removesuffix(".py")
        assert mine in ROOMS, f"{p}: a room the layering does not name"
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                mods = [f"pipeline.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names if a.name.startswith("pipeline.")]
            else:
                continue
            bad += [f"{p.relative_to(ROOT)} imports {m}" for m in mods
                    if _room(m) != mine and _room(m) not in ROOMS[mine]]
    assert bad == []


def test_config_imports_nothing_else_of_the_project():
    for p in (ROOT / "pipeline" / "config").rglob("*.py"):
        for line in re.findall(r"^\s*(?:from|import)\s+(pipeline[\w.]*)", p.read_text(), re.M):
            assert line.startswith("pipeline.config"), f"{p.name} imports {line}"


def test_only_the_cli_imports_the_flows_and_the_flows_never_import_it():
    assert imports_of("flows") == ["pipeline/cli.py"]
    assert imports_of(r"pipeline\.cli", "flows") == []


# function-level imports allowed, and why: Ray is needed only with ray.enabled (and absent on
# the GPU check's machine), Ray Train only for DDP, matplotlib only when plots are drawn,
# deltalake (an optional extra) only with output.format: delta, statsforecast (via
# pipeline.evaluation.comparators) only when the comparators or the AutoETS fallback run,
# hierarchicalforecast (scikit-learn with it: seconds to import) only when reconciling
LAZY = {"pipeline.execution.ray_train": "Ray only when enabled", "ray.train": "DDP only",
        "ray.train.torch": "DDP only", "matplotlib": "plots only",
        "matplotlib.pyplot": "plots only", "deltalake": "output.format delta only",
        "deltalake.exceptions": "output.format delta only",
        "pipeline.evaluation.comparators": "statsforecast (seconds to import) only when "
                                           "comparators run",
        "pipeline.execution.ray_tune": "Ray Tune only for the tune command",
        "optuna": "tune.search optuna only", "ray.tune.search.optuna": "tune.search optuna only",
        "ray.tune.search": "tune.search random or grid only",
        "ray.tune.schedulers": "tune.scheduler asha only",
        "boto3": "aborting multipart uploads on S3 only",
        "hierarchicalforecast": "reconciliation only (imports scikit-learn, seconds)"}


def _functions():
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        text = p.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield p.relative_to(ROOT), node, text.splitlines()[node.lineno - 1:
                                                                  node.end_lineno]


def test_no_module_over_400_lines():
    long = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
            if len(p.read_text().splitlines()) > 400]
    assert long == []


def test_no_function_over_50_lines_unless_a_comment_says_why():
    long = [f"{p}:{node.name} ({len(lines)} lines)" for p, node, lines in _functions()
            if len(lines) > 50 and not any("# longer than 50 lines:" in ln for ln in lines)]
    assert long == []


def test_imports_are_at_the_top_but_for_optional_dependencies():
    inner = [f"{p}:{sub.lineno} {node.name} imports {name}" for p, node, _ in _functions()
             for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)
             for name in ([sub.module] if isinstance(sub, ast.ImportFrom) else
                          [a.name for a in sub.names])
             if name not in LAZY]
    assert inner == []
