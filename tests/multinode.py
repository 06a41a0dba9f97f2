"""Run by tests/test_cluster.py in a subprocess (the test session already holds a Ray
instance): a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head
node and a second node, each a raylet with its own object store and 1 CPU), joined through
`ray.address` as a deployment would; per-group training as Ray tasks; then the same jobs in
one process. Prints one JSON line: the nodes, which node trained each group, and the largest
weight difference between the two paths."""
import io
import json
import sys

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from timeouts import SERVICE, scaled

from pipeline import config as C
from pipeline.data.prepare import local_runner, prepare
from pipeline.execution import ray_train as execution
from pipeline.training.jobs import run_jobs_locally
from pipeline.training.plan import plan_jobs, plan_packs


def weights(result) -> dict:
    return torch.load(io.BytesIO(result.state), weights_only=True)


def main(data: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes(timeout=scaled(SERVICE))
    cfg = C.load("configs/per_group.yaml", [
        f"data.path={data}", "train.per_group.packed=false", "train.epochs=2",
        "train.steps_per_epoch=3", "windows.lookback=72", "tracking.enabled=false",
        f"ray.address={cluster.address}", "ray.task_num_cpus=1", "ray.max_retries=1"])
    try:
        arrays = prepare(cfg, local_runner).arrays
        jobs = plan_jobs(arrays, cfg)
        assert execution.connect(cfg.ray)             # joins the cluster at ray.address
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        on_ray = execution.train(arrays, plan_packs(jobs, cfg), cfg)
        ray.shutdown()
        torch.set_num_threads(1)
        local = run_jobs_locally(arrays, jobs, cfg)
        diff = max(float((weights(a)[k] - weights(b)[k]).abs().max())
                   for a, b in zip(on_ray, local, strict=True) for k in weights(a))
        print(json.dumps({
            "nodes": nodes, "ok": [r.ok for r in on_ray],
            "trained_on": {r.name: r.node for r in on_ray},
            "best_val": [[a.best_val, b.best_val] for a, b in zip(on_ray, local, strict=True)],
            "max_weight_diff": diff, "finite": bool(np.isfinite(diff))}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
