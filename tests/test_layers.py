"""Architecture invariants: Ray only in the execution layer, MLflow only in tracking, and the
models, windows and training loop importable without Ray, MLflow or Polars."""
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
import pipeline.models, pipeline.models.packed, pipeline.train, pipeline.jobs
import pipeline.data.windows, pipeline.data.loader, pipeline.data.scaling, pipeline.config
print('ok')
"""


def test_core_imports_without_ray_mlflow_or_polars():
    r = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def imports_of(module: str) -> list[str]:
    pattern = re.compile(rf"^\s*(import|from)\s+{module}\b", re.M)
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
                  if pattern.search(p.read_text()))


def test_ray_is_imported_only_by_the_execution_layer():
    assert imports_of("ray") == ["pipeline/execution.py"]


def test_mlflow_is_imported_only_by_the_tracking_layer():
    assert set(imports_of("mlflow")) <= {"pipeline/tracking.py", "pipeline/registry.py"}


def test_config_imports_nothing_of_the_project():
    assert "from pipeline" not in (ROOT / "pipeline" / "config.py").read_text()
