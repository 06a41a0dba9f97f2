"""Run by tests/test_cluster.py in a subprocess (the test session already holds a Ray
instance): a one-node cluster of this script's own whose memory monitor kills a task when the
machine's used memory passes a threshold set just above what it uses now (Ray's own
`memory_usage_threshold`; Ray's kill, not a machine-wide out-of-memory). `python -m pipeline
run` joins it through `ray.address`; once the run trains, a ballast process this script starts
(and ends, by its own handle) grows in steps until Ray's memory monitor kills the training
task. Prints one JSON line: the threshold, the ballast's peak, the run's exit code and its
stderr."""
import json
import subprocess
import sys
import threading
import time

import ray
from deadnode import start_run, wait_for_training
from ray._private.utils import get_system_memory, get_used_memory
from ray.cluster_utils import Cluster
from timeouts import COMMAND, SERVICE, STOP, scaled

GIB = 2 ** 30
HEADROOM = 3 * GIB       # above today's use: the run's driver and workers fit under it
BALLAST_STEP = GIB // 4  # the ballast grows by this every 0.2 s ...
BALLAST_MAX = 8 * GIB    # ... up to this, or until the run ends

# allocates and touches BALLAST_STEP bytes every 0.2 s up to BALLAST_MAX, then holds
BALLAST = f"""
import sys, time
held = []
while sum(map(len, held)) < {BALLAST_MAX}:
    held.append(bytearray(b"\\x01") * {BALLAST_STEP})
    print(sum(map(len, held)), flush=True)
    time.sleep(0.2)
time.sleep(3600)
"""


def main(data: str, out: str) -> None:
    total = get_system_memory()
    # the fraction at which Ray's memory monitor kills (Ray measures as get_used_memory does)
    threshold = min(0.95, (get_used_memory() + HEADROOM) / total)
    if get_used_memory() + HEADROOM + BALLAST_MAX > 0.97 * total:
        print(json.dumps({"skip": f"too little free memory for the ballast ({total} bytes)"}))
        return
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {
            "memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 100,
            "task_oom_retries": 0}})
    run = ballast = None
    peak = [0]
    try:
        cluster.wait_for_nodes(timeout=scaled(SERVICE))
        run, _lines = start_run(cluster.address, data, out, epochs=200)
        ray.init(address=cluster.address, log_to_driver=False)
        wait_for_training(run, _lines)
        ballast = subprocess.Popen([sys.executable, "-c", BALLAST], stdout=subprocess.PIPE,
                                   text=True)
        threading.Thread(target=lambda: [peak.__setitem__(0, int(x)) for x in ballast.stdout],
                         daemon=True).start()
        started = time.monotonic()
        run.wait(timeout=scaled(COMMAND))      # its stderr is a few lines: no pipe fills
        print(json.dumps({"threshold": round(threshold, 3), "ballast_peak": peak[0],
                          "code": run.returncode, "stderr": run.stderr.read(),
                          "seconds_to_exit": round(time.monotonic() - started, 1)}))
    finally:
        for p in (ballast, run):
            if p is not None and p.poll() is None:
                p.kill()                           # by its own handle
                p.wait(timeout=scaled(STOP))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
