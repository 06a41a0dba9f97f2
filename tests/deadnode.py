"""Run by tests/test_cluster.py in a subprocess (the test session already holds a Ray
instance): a two-node cluster of this script's own (ray.cluster_utils.Cluster: a head with no
CPU, so every task runs on the second node), `python -m pipeline run` joined to it through
`ray.address`; once the run has said it is training and a task holds the second node's CPU
(the free resources of this cluster, from its GCS), the second node is removed
(`Cluster.remove_node`: the processes this script's cluster started, nothing else).
Prints one JSON line: the node removed, the run's exit code and its stderr."""
import json
import os
import subprocess
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster
from timeouts import COMMAND, EVENT, SERVICE, scaled


def start_run(address: str, data: str, out: str, epochs: int) -> tuple:
    """`python -m pipeline run` (per group, one task at a time, no retries) joined to the
    cluster at `address`; returns the process and the list its stdout lines go into."""
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", "configs/per_group.yaml",
         "--set", f"data.path={data}", "--set", f"output.path={out}",
         "--set", "train.per_group.packed=false", "--set", f"train.epochs={epochs}",
         "--set", "train.steps_per_epoch=20", "--set", "windows.lookback=72",
         "--set", "evaluate.plots=0", "--set", "evaluate.comparators=[]",
         "--set", f"ray.address={address}", "--set", "ray.task_num_cpus=1",
         "--set", "ray.max_retries=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True).start()
    return run, lines


def wait_for_training(run, lines: list[str]) -> None:
    """Until the run has said it is training and a task holds the cluster's CPU (the free
    resources of this cluster, from its GCS; `ray.init` to it first)."""
    end = time.monotonic() + scaled(EVENT)
    while time.monotonic() < end and run.poll() is None:
        if any(line.startswith("training") for line in lines) and \
                ray.available_resources().get("CPU", 0) == 0:    # a training task runs
            break
        time.sleep(0.5)
    assert run.poll() is None, "the run ended before its training started"


def main(data: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=1)
    run = None
    try:
        cluster.wait_for_nodes(timeout=scaled(SERVICE))
        run, lines = start_run(cluster.address, data, out, epochs=50)
        ray.init(address=cluster.address, log_to_driver=False)
        wait_for_training(run, lines)
        cluster.remove_node(worker)
        removed = time.monotonic()
        run.wait(timeout=scaled(COMMAND))      # its stderr is a few lines: no pipe fills
        err = run.stderr.read()
        print(json.dumps({"node": worker.node_id, "code": run.returncode, "stderr": err,
                          "seconds_to_exit": round(time.monotonic() - removed, 1)}))
    finally:
        if run is not None and run.poll() is None:
            run.kill()                              # by its own handle
            run.wait()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
