"""Data of task ``llm``: chatterbot-corpus question-answer pairs as token tensors.

The English corpus (PyPI ``chatterbot-corpus``) has 21 topic files; each pair of
consecutive lines of a conversation is a (prompt, answer) pair. Every tenth pair of
each topic is held out for the centralized perplexity (in a fixed shuffled order).
A pair becomes

- ``x``: ``[seq_len]`` input ids, right-padded with ``PAD`` (-1, which the model drops
  or maps to its pad token);
- ``y``: ``[seq_len]`` next-token labels, ``-100`` on the prompt and the padding, so
  the loss and the perplexity count answer tokens only.

SmolLM2 and other Hugging Face models format the pair with their chat template;
``tiny-opt`` has no tokenizer and reads UTF-8 bytes (``User: ...\\nAssistant: ...``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snake_flower.tasks.base import Task
from snake_flower.tasks.data import DataError, Split, preload_partitions
from snake_flower.tasks.llm import (
    PAD,
    TINY_OPT_TOKENS,
    build_segments,
    load_config,
    load_tokenizer,
    segment_names,
)

IGNORE = -100  # PyTorch's ignore_index
HELD_OUT_EVERY = 10
_BYTE_OFFSET = 3  # tiny-opt: ids 0..2 are OPT's specials (pad 1, bos/eos 2)


def corpus_dir(data_dir: str = "") -> Path:
    """``data-dir`` if it holds ``*.yml`` topic files, else the installed English corpus."""
    if data_dir:
        if not sorted(Path(data_dir).glob("*.yml")):
            raise DataError(f"data-dir {data_dir}: no chatterbot-style *.yml topic files")
        return Path(data_dir)
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task llm needs the PyPI package chatterbot-corpus: "
                        "pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(spec.submodule_search_locations[0]) / "data" / "english"


@lru_cache(maxsize=2)
def load_pairs(data_dir: str = "") -> tuple[tuple[str, str, str], ...]:
    """Every ``(topic, prompt, answer)`` of the corpus, topics in file-name order."""
    import yaml

    pairs = []
    for path in sorted(corpus_dir(data_dir).glob("*.yml")):
        with open(path, encoding="utf-8") as fh:
            conversations = (yaml.safe_load(fh) or {}).get("conversations", [])
        for conversation in conversations:
            lines = [str(line) for line in conversation]
            pairs += [(path.stem, q, a) for q, a in zip(lines[:-1], lines[1:])]
    return tuple(pairs)


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the formatted pair and the number of prompt tokens."""
    if tokenizer is None:  # tiny-opt: bytes, shifted past OPT's special ids
        def ids(text: str) -> list[int]:
            return [_BYTE_OFFSET + b for b in text.encode()]
        head = [TINY_OPT_TOKENS["bos"]] + ids(f"User: {prompt}\nAssistant: ")
        return head + ids(answer) + [TINY_OPT_TOKENS["eos"]], len(head)
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    return tokenizer(full, add_special_tokens=False)["input_ids"], len(head_ids)


def to_example(ids: list[int], prompt_len: int, seq_len: int) -> tuple[list[int], list[int]] | None:
    """``(x, y)`` of one pair, or ``None`` when no answer token fits in ``seq_len``."""
    x, y = ids[:-1][:seq_len], ids[1:][:seq_len]
    y = [IGNORE] * min(prompt_len - 1, len(y)) + y[prompt_len - 1:]
    if all(t == IGNORE for t in y):
        return None
    return x + [PAD] * (seq_len - len(x)), y + [IGNORE] * (seq_len - len(y))


@lru_cache(maxsize=2)
def chat_arrays(model: str, seq_len: int, data_dir: str = "") -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """``((x_train, y_train, topic_train, x_test, y_test), topic names)`` as numpy int64 arrays.

    The tokenized corpus, without a torch op: a node launcher's forkserver computes it once
    (``preload_chat``) and the ClientApps it forks find it here.
    """
    tokenizer = load_tokenizer(model)
    pairs = load_pairs(data_dir)
    topics = tuple(sorted({topic for topic, _, _ in pairs}))
    rows: dict[bool, list] = {False: [], True: []}
    seen: dict[str, int] = {}
    for topic, prompt, answer in pairs:
        held_out = seen.get(topic, 0) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        seen[topic] = seen.get(topic, 0) + 1
        example = to_example(*encode_pair(tokenizer, prompt, answer), seq_len)
        if example is not None:
            rows[held_out].append((*example, topics.index(topic)))
    if not rows[False] or not rows[True]:
        raise DataError(f"task llm: no pair has an answer token within seq-len {seq_len}")
    train, test = ([np.array([r[i] for r in rows[part]], dtype=np.int64) for i in range(3)] for part in (False, True))
    return (train[0], train[1], train[2], test[0], test[1]), topics


@lru_cache(maxsize=2)
def load_chat(model: str, seq_len: int, data_dir: str = "") -> tuple[Split, torch.Tensor, tuple[str, ...]]:
    """``((x_train, y_train, x_test, y_test), train topic ids, topic names)``."""
    arrays, topics = chat_arrays(model, seq_len, data_dir)
    x_train, y_train, topic_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    # a fixed shuffle of the held-out pairs, so that eval-samples takes every topic's share
    order = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))
    return (x_train, y_train, x_test[order], y_test[order]), topic_train, topics


def preload_chat(config: Mapping[str, Any], num_partitions: int, partition_id: int) -> bool:
    """Tokenize the corpus and cut its partitions for ``config`` (task ``llm``), without a torch op.

    What ``load_chat`` and ``partition_from_config`` then find in their caches in this process
    and in every process forked from it (``deploy/warm_node.py``). ``False`` for another task.
    """
    if config["task"] != "llm":
        return False
    arrays, _ = chat_arrays(str(config["model"]), int(config["seq-len"]), str(config["data-dir"]))
    preload_partitions(tuple(arrays[2].tolist()), config, num_partitions, partition_id)
    return True


def align_tokens(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per answer token: ``(logits [n, vocab], labels [n])``."""
    y = y[:, :logits.shape[1]]  # the model dropped the all-padding columns
    keep = y != IGNORE
    return logits[keep], y[keep]


@lru_cache(maxsize=4)
def llm_task(model: str, finetune: str, lora_rank: int, seq_len: int, lora_dropout: float = 0.0,
             gradient_checkpointing: bool = False) -> Task:
    """Task ``llm`` for one model and fine-tuning mode (raises ``ModelError`` in one line)."""
    return Task("llm", segment_names(load_config(model), finetune),
                build=partial(build_segments, model, finetune, lora_rank, lora_dropout, gradient_checkpointing),
                load=lambda data_dir: load_chat(model, seq_len, data_dir)[0],
                align=align_tokens,
                partition_by=lambda data_dir: load_chat(model, seq_len, data_dir)[1],
                max_eval_batch=16)
