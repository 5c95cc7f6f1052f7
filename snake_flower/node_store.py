"""A Snake node's copy of the model, on its own disk between visits.

A node keeps the model as it last held it (everything it was sent, and its trained
window) with the version of every segment, in a state directory: never in RAM between
visits, never in ``context.state`` (which Flower ships with every message). The layout:

- one ``torch.save`` file per segment (``seg-<name>-<token>.pt``), plus one for the keys in
  no segment (``rest-<token>.pt``: a frozen segment, say), written whole;
- ``copy.json``: each segment's file and version. It is written last, to a temporary
  file that then replaces the old one (``os.replace``), so a crash at any point leaves
  either the old copy or the new one, never a mix. Files it no longer names are removed
  after it is replaced.

The files are read back memory-mapped (``torch.load(mmap=True)``): a node's frozen layers
are restored from the page cache, not from a second copy in its memory. ``torch.save``
rather than safetensors: it is part of torch (safetensors comes with the ``llm`` extra
only), it memory-maps as well and it keeps bfloat16.

The directory is ``<state-dir>/run-<run id>/partition-<partition id>`` (``node-<node id>``
without a partition): two nodes or two runs never share one. ``state-dir`` comes from the
node's ``--node-config``, else ``$XDG_CACHE_HOME/snake-flower/nodes`` (``~/.cache/...``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

MANIFEST = "copy.json"
FORMAT = 1


def default_state_root() -> Path:
    """``$XDG_CACHE_HOME/snake-flower/nodes``, else ``~/.cache/snake-flower/nodes``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "snake-flower" / "nodes"


def run_state_dir(root: str | Path | None, run_id: int) -> Path:
    """Where every node of run ``run_id`` under ``root`` (``None``: the default) keeps its copy."""
    return Path(root if root is not None else default_state_root()) / f"run-{run_id}"


def node_state_dir(root: str | Path | None, run_id: int, partition_id: int | None, node_id: int) -> Path:
    """The state directory of one node of one run (see the module docstring)."""
    node = f"partition-{partition_id}" if partition_id is not None else f"node-{node_id}"
    return run_state_dir(root, run_id) / node


@dataclass(frozen=True)
class StoredCopy:
    """A node's copy as read from its state directory.

    ``tensors`` are memory-mapped, by ``state_dict`` key: read them, never write them.
    ``parts`` names each part's keys (a segment's, or ``""``: the keys in no segment), so
    that a reader can take the copy one file at a time and let each mapping go.
    """

    versions: dict[str, int]
    tensors: dict[str, torch.Tensor]
    files: dict[str, str]
    parts: dict[str, list[str]] = field(default_factory=dict)


class CopyUnreadable(Exception):
    """The state directory exists but its copy cannot be read (one-line message)."""


class NodeStore:
    """One node's copy of the model in ``directory`` (created on the first write).

    Parameters
    ----------
    directory : Path
        The node's own state directory (``node_state_dir``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def read(self, tensors: bool = True) -> StoredCopy | None:
        """The stored copy, ``None`` if there is none; raises ``CopyUnreadable`` if it is damaged.

        Every file is read (memory-mapped) to check it. With ``tensors=False`` each file's
        mapping goes again before the next is read, and the copy comes without tensors:
        take its parts one at a time with ``load_part``.
        """
        manifest = self.directory / MANIFEST
        if not manifest.exists():
            return None
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            versions = {str(name): int(v) for name, v in meta["versions"].items()}
            files = {str(name): str(file) for name, file in meta["files"].items()}
            mapped: dict[str, torch.Tensor] = {}
            parts: dict[str, list[str]] = {}
            for name, file in files.items():
                part = self._load(file)
                parts[name] = list(part)
                if tensors:
                    mapped.update(part)
                del part
        except Exception as err:  # any damage (truncated, missing file, bad JSON): resync
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CopyUnreadable(f"{self.directory}: {type(err).__name__}: {first}"[:300]) from None
        return StoredCopy(versions, mapped, files, parts)

    def load_part(self, copy: StoredCopy, name: str) -> dict[str, torch.Tensor]:
        """Part ``name`` of ``copy`` (read with ``read``), memory-mapped; raises ``CopyUnreadable``."""
        try:
            return self._load(copy.files[name])
        except Exception as err:  # changed on disk since it was read
            raise CopyUnreadable(f"{self.directory}: part {name!r}: {type(err).__name__}") from None

    def _load(self, file: str) -> dict[str, torch.Tensor]:
        return torch.load(self.directory / file, mmap=True, weights_only=True, map_location="cpu")

    def write(self, state: Mapping[str, torch.Tensor], parts: Mapping[str, Iterable[str]],
              versions: Mapping[str, int], old: StoredCopy | None = None) -> StoredCopy:
        """Store ``parts`` (segment name -> its keys; ``""``: the keys in no segment) of ``state``
        over ``old`` (the copy read before), with ``versions``; atomically (module docstring)."""
        files = {name: self.write_part(name, {key: state[key] for key in keys}) for name, keys in parts.items()}
        return self.commit(files, versions, old)

    def write_part(self, name: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """Write one part (segment ``name``, or ``""``) to a new file; return its name for ``commit``.

        Until ``commit`` names it, the file is no part of the copy (a crash leaves the old one).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        owned = {key: _own(tensor) for key, tensor in tensors.items()}
        prefix = "rest" if name == "" else f"seg-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:40]}"
        final = f"{prefix}-{secrets.token_hex(6)}.pt"
        _write_atomically(self.directory / final, lambda f: torch.save(owned, f))
        return final

    def commit(self, files: Mapping[str, str], versions: Mapping[str, int], old: StoredCopy | None = None,
               read_back: bool = True) -> StoredCopy:
        """Make the parts ``files`` (``write_part``'s, by part name) over ``old``'s the copy, with
        ``versions``: the manifest replaced last, then the files it no longer names removed.

        Returns the copy read back (memory-mapped), or with ``read_back=False`` its versions
        and files alone (no tensor: nothing is mapped).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        files = {**(old.files if old is not None else {}), **files}
        meta = {"format": FORMAT, "versions": dict(versions), "files": files}
        _write_atomically(self.directory / MANIFEST, lambda f: f.write(json.dumps(meta).encode()))
        _sync_directory(self.directory)
        for path in self.directory.iterdir():  # the replaced files, and any a crash left behind
            if path.name != MANIFEST and path.name not in files.values():
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # still mapped where the platform forbids that: next write
                    pass
        if not read_back:
            return StoredCopy(dict(versions), {}, files)
        copy = self.read()
        assert copy is not None
        return copy

    def remove(self) -> None:
        """Delete the copy and its directory."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with a storage of its own: ``torch.save`` writes a view's whole storage."""
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
        return tensor.contiguous().clone()
    return tensor


def _write_atomically(path: Path, write) -> None:  # noqa: ANN001 (a callable of an open file)
    """Write ``path`` through a temporary file in the same directory, synced, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _sync_directory(directory: Path) -> None:
    """Make the renames durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
