"""Run by tests/test_cluster.py in a subprocess: the main job on a real two-node Ray cluster
(ray.cluster_utils.Cluster: a head and a second node, 1 CPU each, joined through `ray.address`)
with its input, outputs and checkpoints on an S3 API (moto in server mode on loopback, started
here), then the same job in one process on local files. Prints one JSON line: the nodes, the
nodes that read the input's parts (Ray's task records), the files on S3, and how the two
forecasts compare."""
import json
import os
import sys
import time

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import ray
import torch
from ray.cluster_utils import Cluster
from timeouts import EVENT, SERVICE, scaled

from pipeline.cli import execute

BUCKET = "pipeline-two-nodes"
FAST = ["train.epochs=2", "train.steps_per_epoch=3", "windows.lookback=72",
        "evaluate.comparators=[]", "evaluate.plots=0", "tracking.enabled=false"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def forecasts(uri: str, fs=None):
    table = ds.dataset(uri, format="parquet", filesystem=fs).to_table()
    order = np.lexsort([table["step"].to_numpy(), table["unique_id"].to_numpy(False)])
    return {c: table[c].to_numpy(zero_copy_only=False)[order]
            for c in ("unique_id", "ds", "step", "y_hat", "model")}


def load_part_nodes(want: int, wait: float = EVENT) -> list[str]:
    """The nodes Ray ran the data stage's part readers on (its task records, which reach the
    state API a little after the tasks end: polled until `want` nodes or `scaled(wait)` seconds)."""
    from ray.util.state import list_tasks
    end, nodes = time.monotonic() + scaled(wait), []
    while True:
        try:
            tasks = list_tasks(filters=[("func_or_class_name", "=", "load_part")],
                               detail=True, limit=1000, raise_on_missing_output=False)
            nodes = sorted({t.node_id for t in tasks if t.node_id})
        except Exception as e:  # noqa: BLE001 - the state API is best effort here
            nodes = [f"unavailable: {type(e).__name__}: {e}"]
        if len(nodes) >= want or time.monotonic() > end:
            return nodes
        time.sleep(1.0)


def main(data: str, out: str) -> None:
    from moto.server import ThreadedMotoServer
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                           region="us-east-1", allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    pafs.copy_files(data, f"{BUCKET}/data", destination_filesystem=s3)
    query = f"?endpoint_override={host}:{port}&scheme=http"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)    # started after the environment: its workers reach S3 too
    cluster.wait_for_nodes(timeout=scaled(SERVICE))
    torch.set_num_threads(1)   # both drivers as the 1-CPU Ray workers: the same float sums
    try:                       # whatever the driver computes (not only under train.threads)
        ray.init(address=cluster.address, log_to_driver=False)   # kept for the task records
        remote = execute(["run", "--config", "configs/per_group.yaml", *sets([
            f"data.path=s3://{BUCKET}/data{query}", f"output.path=s3://{BUCKET}/out{query}",
            f"ray.address={cluster.address}", "ray.task_num_cpus=1", "train.checkpoint_minutes=0",
            "train.per_group.packed=false", *FAST])])
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        readers = load_part_nodes(len(nodes))
        trained = sorted({r.node for r in remote.outcome.final.results})
        ray.shutdown()
        local = execute(["run", "--config", "configs/per_group.yaml", *sets([
            f"data.path={data}", f"output.path={out}", "ray.enabled=false",
            "train.per_group.packed=false", *FAST])])
        files = sorted(i.path for i in s3.get_file_info(pafs.FileSelector(
            f"{BUCKET}/out", recursive=True)) if i.type == pafs.FileType.File)
        mine = forecasts(f"{BUCKET}/out/forecasts", s3)
        theirs = forecasts(os.path.join(out, "forecasts"))
        same = all(np.array_equal(mine[c], theirs[c]) for c in ("unique_id", "ds", "step",
                                                                  "model"))
        diff = float(np.max(np.abs(mine["y_hat"] - theirs["y_hat"])))
        print(json.dumps({"codes": [remote.exit_code, local.exit_code], "nodes": nodes,
                          "readers": readers, "trained_on": trained, "files": files,
                          "rows": len(mine["y_hat"]), "same_keys": same,
                          "max_y_hat_diff": diff}))
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
