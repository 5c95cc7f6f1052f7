"""``snake-flower memory --measure``: a node's real memory for one hop, beside its ledger.

Each arm (``fedavg``: every segment trains; ``snake``: a window of decoder layers at the
bottom of the sweep, where backward runs through the whole model) runs in a fresh Python
process, so that no arm inherits another's peak or allocator state. The process:

1. imports torch, transformers and this package and makes the batches (``batch x seq``
   random token ids, every position a label: the longest a batch of the task can be);
2. reads its resident set (``baseline_rss_bytes``) and resets the kernel's peak
   (``/proc/self/clear_refs``), so that the peak counts what the hop adds;
3. builds the node's model with random weights from the architecture (``architectures``
   presets, nothing downloaded): the segments that train in fp32, every other segment
   directly in the frozen dtype, never in fp32 first. That is the node's copy as it keeps
   it, compactly: payloads in the frozen dtype (fp16 payloads for fp16; int8 for int8)
   represent it exactly, so the held layers are the copy and there is nothing to restore;
4. trains the window for ``steps`` steps with the real training code (``train_window``)
   and the chosen optimizer, and reads the peak resident set (``peak_rss_bytes``) and the
   hop's ledger (``total_bytes``).

The paper's memory figures use Adam (``--optimizer adam``); runs train with SGD.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

ARMS = ("fedavg", "snake")
OPTIMIZERS = ("adam", "sgd")
HELD = ("auto", "fp32", "fp16", "bf16")


class MeasureError(ValueError):
    """A bad option, or an arm whose process failed (the message is one line)."""


@dataclass(frozen=True)
class MeasureOptions:
    """One measurement: the model, the task's batch shape and the local work.

    Attributes
    ----------
    model : str
        An ``architectures`` preset (``smollm2-135m``, ``opt-350m``, ``opt-1.3b``, ``tiny-opt``...).
    batch, seq : int
        Sequences per step and tokens per sequence (``experiments/llm.toml``: 8 x 96).
    steps : int
        Training steps of the hop (2: the second step runs with the optimizer's state).
    optimizer : str
        ``sgd`` (momentum 0.9, as runs train) or ``adam`` (the paper's setting).
    frozen_dtype : str
        What Snake holds its frozen layers in: ``auto`` (``frozen.native_dtype``), fp32, fp16, bf16.
    window : int
        Decoder layers Snake trains, from the bottom of the sweep.
    """

    model: str = "smollm2-135m"
    batch: int = 8
    seq: int = 96
    steps: int = 2
    optimizer: str = "sgd"
    frozen_dtype: str = "auto"
    window: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "steps", "window"):
            if getattr(self, name) < 1:
                raise MeasureError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise MeasureError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.frozen_dtype not in HELD:
            raise MeasureError(f"frozen-dtype: {self.frozen_dtype!r} is not one of {', '.join(HELD)} "
                               "(int8 is measured by the tests, not here)")


def measure(options: MeasureOptions, arms: tuple[str, ...] = ARMS, timeout: float = 3600.0) -> dict[str, Any]:
    """Run each arm in a fresh process; return their figures and Snake's ratio to FedAvg.

    Raises
    ------
    MeasureError
        If the model is unknown, or an arm's process fails or times out.
    """
    from snake_flower.tasks.architectures import ArchitectureError, load_config

    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise MeasureError(f"strategies: {','.join(unknown) or 'none'} not among {', '.join(ARMS)}")
    try:
        load_config(options.model)
    except ArchitectureError as err:
        raise MeasureError(str(err)) from None
    report: dict[str, Any] = {"model": options.model, "options": asdict(options)}
    for arm in arms:
        report[arm] = _spawn(arm, options, timeout)
    if all(arm in report for arm in ARMS):
        grown = {arm: report[arm]["peak_rss_bytes"] - report[arm]["baseline_rss_bytes"] for arm in ARMS}
        report["snake_over_fedavg"] = {
            "measured": round(grown["snake"] / grown["fedavg"], 4),
            "ledger": round(report["snake"]["total_bytes"] / report["fedavg"]["total_bytes"], 4)}
    return report


def _spawn(arm: str, options: MeasureOptions, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "snake_flower.training.measure", arm, json.dumps(asdict(options))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{arm}: the hop did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasureError(f"{arm}: the measuring process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss() -> tuple[int, int]:
    """``(resident, peak resident)`` bytes of this process (``/proc/self/status``)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    """Let the peak resident set start again from the current one (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_arm(arm: str, options: MeasureOptions) -> dict[str, Any]:
    """One hop of ``arm`` in this process (call it in a fresh one: see ``measure``)."""
    import torch

    from snake_flower.tasks.architectures import load_config
    from snake_flower.tasks.llm_data import align_tokens
    from snake_flower.training.frozen import DTYPES, resolve_dtype
    from snake_flower.tasks.task import segment_keys
    from snake_flower.training.loop import LocalWork, train_window

    config = load_config(options.model)
    held = resolve_dtype(options.frozen_dtype, "llm") if arm == "snake" else "fp32"
    gen = torch.Generator().manual_seed(0)
    rows = options.batch * options.steps
    x = torch.randint(3, config.vocab_size, (rows, options.seq), generator=gen)
    y = torch.randint(3, config.vocab_size, (rows, options.seq), generator=gen)
    for _ in range(2):  # lazy imports, kernels and thread pools belong to the baseline, not the hop
        warm = build_node_model(miniature(config), DTYPES[held], arm, options.window)
        train_window(warm, trained_segments(warm, arm, options.window), (x[:, :8] % 256, y[:, :8] % 256),
                     segments=segment_keys(warm), seed=0, align=align_tokens,
                     work=LocalWork(steps=1, batch_size=options.batch, frozen_dtype=held, optimizer=options.optimizer))
        del warm
    baseline, _ = rss()
    reset_peak()
    start = time.perf_counter()
    model = build_node_model(config, DTYPES[held], arm, options.window)
    window = trained_segments(model, arm, options.window)
    built = time.perf_counter() - start
    work = LocalWork(steps=options.steps, batch_size=options.batch, lr=1e-4, momentum=0.9,
                     clip_norm=1.0, frozen_dtype=held, optimizer=options.optimizer)
    trained = train_window(model, window, (x, y), segments=segment_keys(model),
                           work=work, seed=0, align=align_tokens)
    _, peak = rss()
    return {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "total_bytes": int(trained["total-bytes"]),
            "ledger": {key.replace("-", "_"): int(value) for key, value in trained.items()
                       if key.endswith("-bytes") and key != "peak-rss-bytes"},
            "window": window if arm == "snake" else ["every segment"],
            "frozen_dtype": held if arm == "snake" else None,
            "payload_dtype": held if arm == "snake" else "fp32",
            "optimizer": options.optimizer, "build_seconds": round(built, 2),
            "train_seconds": round(trained["train-seconds"], 2)}


def build_node_model(config: Any, held: Any, arm: str, window: int) -> Any:
    """The node's model from ``config``, random weights: frozen segments born in ``held``.

    transformers initialises the whole model in ``held`` (no fp32 copy ever exists); the
    segments that train are then cast to fp32, one at a time.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from snake_flower.tasks.llm import CausalLMSegments

    dtype = torch.float32 if arm == "fedavg" else held
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = CausalLMSegments(lm).train()
    for name in trained_segments(model, arm, window):
        getattr(model, name).float()
    return model


def miniature(config: Any) -> Any:
    """``config`` shrunk to a few thousand parameters a layer: the same code runs, on toy sizes."""
    import copy

    small = copy.deepcopy(config)
    heads = small.num_attention_heads
    small.num_hidden_layers, small.vocab_size, small.hidden_size = 2, 256, 8 * heads
    for name in ("intermediate_size", "ffn_dim"):
        if hasattr(small, name):
            setattr(small, name, 32 * heads)
    if hasattr(small, "word_embed_proj_dim"):
        small.word_embed_proj_dim = small.hidden_size
    if getattr(small, "head_dim", None):
        small.head_dim = 8
    return small


def trained_segments(model: Any, arm: str, window: int) -> list[str]:
    """Every segment (FedAvg), or Snake's window: the first ``window`` decoder layers.

    With ``frozen-segments = "embed,head"`` (``experiments/llm.toml``) the sweep starts at
    the first decoder layer: the bottom of the sweep, where backward crosses every layer.
    """
    names = [name for name, _ in model.named_children()]
    return names if arm == "fedavg" else names[1:1 + window]


def main(argv: list[str]) -> int:
    """``python -m snake_flower.training.measure ARM OPTIONS_JSON``: print the arm's JSON."""
    arm, options = argv[0], MeasureOptions(**json.loads(argv[1]))
    if arm not in ARMS:
        raise MeasureError(f"arm: {arm!r} is not one of {', '.join(ARMS)}")
    print(json.dumps(run_arm(arm, options)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
