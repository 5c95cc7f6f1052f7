"""What a warm node's forkserver preloads: one torch thread, the app, this node's data."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np

WARM_ENV = "SNAKE_FLOWER_WARM"  # (importing deploy.warm_node here would patch this test process)

PROBE = """
import gc, sys
import torch
from snake_flower.deploy import warm_node
from snake_flower.tasks import data
from flwr.supercore.inflatable.inflatable_utils import pull_objects
print(warm_node.PRELOADED, torch.get_num_threads(), data._partitions.cache_info().currsize,
      pull_objects.__kwdefaults__["initial_backoff"], gc.get_freeze_count() > 100_000,
      "snake_flower.deploy.warm_executor" in sys.modules)
"""


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_the_forkserver_preload_holds_the_partitions_on_one_thread(tmp_path):
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", np.zeros((30, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(30) % 10)
    # the node's own data-dir (its --node-config) wins over the run-config's, as in its tasks
    spec = json.dumps({"run-config": "data-dir='/the/servers/dir' partitioner='iid'", "partition-id": 2,
                       "num-partitions": 3, "data-dir": str(tmp_path)})
    env = {**{k: v for k, v in os.environ.items() if k != "SNAKE_FLOWER_STOCK_FLOWER"}, WARM_ENV: spec,
           "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    # one thread, the partitions cut, the back-off fix, what was loaded frozen, the SuperExec's module
    assert out == ["True", "1", "1", "0.02", "True", "True"]
