"""A Flower ``Message`` through a file, object by object, as a deployed ClientApp receives it.

In a deployment the SuperNode hands its ``flwr-clientapp`` process a message as Flower's
deflated objects (the message, its records, each ``Array``), pulled by worker threads
(``pull_objects``) and then inflated with Flower's ``inflate_object_from_contents`` (the one
in Flower's module: in a node launcher's ClientApp and in ``memory --measure``'s node, the
patched one of ``runtime/message_inflate.py``), which lets go of each object's bytes once
inflated. ``write_message`` stores exactly those objects, one after the other;
``read_message`` reads them with as many worker threads and inflates them the same way, so
a process that reads a message holds what a deployed ClientApp holds, and no more: no
pickle of the whole message, no second copy of the file.

The file is ``b"SFMSG1\\n"``, the root object's id (64 hex digits) and then, per object,
its id, its length (8 bytes, big-endian) and its deflated bytes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.constant import FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS
from flwr.supercore.inflatable import inflatable_utils

MAGIC = b"SFMSG1\n"
_ID = 64  # a SHA-256 object id, hex


class MessageFileError(ValueError):
    """A message file that is not one (one-line message)."""


def write_message(message: Message, path: Path) -> int:
    """Write ``message``'s deflated objects to ``path``; return their bytes (what travels).

    Each object is deflated, written and let go of before the next, as Flower pushes them.
    """
    objects = get_all_nested_objects(message)
    root = message.object_id
    total = 0
    with open(path, "wb") as f:
        f.write(MAGIC + root.encode())
        for object_id in list(objects):
            content = objects.pop(object_id).deflate()
            f.write(object_id.encode() + len(content).to_bytes(8, "big"))
            f.write(content)
            total += len(content)
            del content
    return total


def read_message(path: Path) -> tuple[Message, int]:
    """The message in ``path`` (inflated as Flower inflates a pulled one) and its objects' bytes.

    The objects are read by as many worker threads as Flower pulls them with
    (``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS``), so that their bytes live where a pulled
    message's do (in the workers' heaps), then inflated in the calling thread.

    Raises
    ------
    MessageFileError
        If ``path`` is not a message file, or is cut short.
    """
    index: list[tuple[str, int, int]] = []  # (object id, offset, size)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise MessageFileError(f"{path}: not a message file")
        root = f.read(_ID).decode()
        while head := f.read(_ID + 8):
            if len(head) != _ID + 8:
                raise MessageFileError(f"{path}: cut short")
            size = int.from_bytes(head[_ID:], "big")
            index.append((head[:_ID].decode(), f.tell(), size))
            f.seek(size, os.SEEK_CUR)
        fd = f.fileno()
        with ThreadPoolExecutor(max_workers=FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS) as pool:
            read = list(pool.map(lambda entry: os.pread(fd, entry[2], entry[1]), index))
    if any(len(content) != size for content, (_, _, size) in zip(read, index)):
        raise MessageFileError(f"{path}: cut short")
    contents = {object_id: content for (object_id, _, _), content in zip(index, read)}
    del read
    total = sum(size for _, _, size in index)
    if root not in contents:
        raise MessageFileError(f"{path}: its root object is missing")
    # through Flower's module, as a ClientApp's pull calls it: with the process's patches, if any
    message = inflatable_utils.inflate_object_from_contents(root, contents)
    if not isinstance(message, Message):
        raise MessageFileError(f"{path}: holds a {type(message).__name__}, not a Message")
    message.metadata.__dict__["_message_id"] = root  # as Flower sets it: the deflated message lacks it
    return message, total
