"""What a warm node's forkserver holds before it forks a ClientApp: torch, the app, the data.

``deploy/warm_executor.py`` names this module as its forkserver's preload, so the
forkserver imports it once, when the node starts, and every task process is forked from
the result. Importing it

- pins torch to one thread before anything uses torch, and runs no torch op: a process
  forked from a parent with a live OpenMP pool can hang, and one with one thread and no
  pool cannot;
- imports Flower's ClientApp runtime (``flwr-clientapp``'s entry), this app, and what torch
  imports lazily on a first training step (``torch._dynamo``, for the optimizer);
- turns on the ClientApps' patches (``runtime/flower_patches.py``): the object-pull back-off,
  and the message inflation that frees each received array's chunks once the array is built;
- reads this node's Fashion-MNIST, normalises the images and cuts its partitions once
  (``tasks.data.preload_partition``), or for task ``llm`` loads the tokenizer, tokenizes the
  corpus and cuts its partitions (``tasks.llm_data.preload_chat``), with the run-config in
  ``SNAKE_FLOWER_WARM`` (the launcher writes it from ``--warm-config`` and ``--node-config``).
  A run whose config differs loads its own data in each task, as stock Flower does;
- imports the warm SuperExec's own module: ``multiprocessing`` runs the SuperExec's
  ``__main__`` (``deploy/warm_executor.py``) again in every forked process, and its imports
  would otherwise cost each task about 0.1 s;
- freezes everything it made (``gc.freeze``): a forked task's garbage collector then never
  walks the half million objects it inherited (0.35 s a full collection) nor copies the
  pages they live on.
"""

from __future__ import annotations

import gc
import json
import os

WARM_ENV = "SNAKE_FLOWER_WARM"

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is first imported, for its OpenMP pool

import torch  # noqa: E402

torch.set_num_threads(1)  # a setting, not an op: no thread pool starts
import torch._dynamo  # noqa: E402,F401  (a torch optimizer imports it on first use: ~2 s per task otherwise)

from flwr.supernode.cli import flwr_clientapp  # noqa: E402,F401  (Flower's ClientApp runtime)

import snake_flower.client_app  # noqa: E402,F401  (the app: tasks, training, strategies)
import snake_flower.deploy.warm_executor  # noqa: E402,F401  (each task's __mp_main__)
from snake_flower.config import parse_overrides, resolve  # noqa: E402
from snake_flower.runtime.flower_patches import patch_clientapp_process  # noqa: E402
from snake_flower.tasks.data import preload_partition  # noqa: E402


def warm_up(spec: str) -> bool:
    """Preload the data named by ``spec`` (``SNAKE_FLOWER_WARM``'s JSON); ``True`` if any."""
    warm = json.loads(spec)
    own = {"data-dir": warm["data-dir"]} if warm.get("data-dir") else {}  # the node's, as its tasks read
    config = resolve(parse_overrides(warm.get("run-config", "")), own)
    if config["task"] == "llm":  # transformers, the tokenizer and the tokenized corpus (LLM nodes only)
        from snake_flower.tasks.llm_data import preload_chat

        return preload_chat(config, int(warm["num-partitions"]), int(warm["partition-id"]))
    return preload_partition(config, int(warm["num-partitions"]), int(warm["partition-id"]))


patch_clientapp_process()
PRELOADED = warm_up(os.environ[WARM_ENV]) if os.environ.get(WARM_ENV) else False
gc.collect()
gc.freeze()  # last: what the tasks inherit stays out of their collections
