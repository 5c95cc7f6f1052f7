"""Flower's message inflation, letting go of each part once the object that holds it is built.

A ClientApp receives a message as Flower's deflated objects: the message, its records, each
``Array`` and the ``ArrayChunk`` objects (5 MB each) its bytes were cut into. Flower's
``inflate_object_from_contents`` (``flwr.supercore.inflatable.inflatable_utils``, flwr 1.41.0
and 1.42.0) keeps every object it inflated in a memo until the whole message is built, so that
a chunk two arrays share is inflated once. ``Array.inflate`` copies its chunks' bytes into the
array's own, so by the end the process holds every array twice: once in the arrays, once in
the chunks of the memo. On a whole-model LLM message (405 MiB, SmolLM2-135M) that second copy
is most of a node's growth before its training starts.

``inflate_releasing_children`` builds the same objects in the same order, but counts first how
many parents each object has (from the objects' heads) and drops an object from the memo as
soon as its last parent is built, and gives freed memory back to the system every 16 MB of
contents (``return_freed_memory``). Whoever keeps a child (a record keeps its arrays) still has
it; a chunk no array needs any more is freed. ``flower_patches.patch_message_inflate`` puts it
in Flower's module, where ``pull_and_inflate_object_from_tree`` (a deployed ClientApp's pull)
finds it.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from typing import Any

from flwr.supercore.inflatable.inflatable_object import get_object_head_values_from_object_content
from flwr.supercore.inflatable.inflatable_utils import inflatable_class_registry

Inflate = Callable[..., Any]
TRIM_EVERY = 16 * 2**20
"""Bytes of inflated objects' contents after which freed memory goes back to the system."""


def releasing_children(flower_inflate: Inflate) -> Inflate:
    """Flower's ``inflate_object_from_contents`` with the memo released as it goes.

    Parameters
    ----------
    flower_inflate : Callable
        Flower's own function, still called when a caller asks for what this one does not
        change (``keep_object_contents=True`` or its own ``objects`` memo).

    Returns
    -------
    Callable
        A function with Flower's signature and result.
    """
    def inflate_object_from_contents(object_id: str, object_contents: dict[str, bytes], *,
                                     keep_object_contents: bool = False,
                                     objects: dict[str, Any] | None = None) -> Any:
        if keep_object_contents or objects is not None:
            return flower_inflate(object_id, object_contents, keep_object_contents=keep_object_contents,
                                  objects=objects)
        return inflate_releasing_children(object_id, object_contents)

    inflate_object_from_contents.__doc__ = flower_inflate.__doc__
    inflate_object_from_contents.releases_children = True  # type: ignore[attr-defined]  (applied once)
    return inflate_object_from_contents


def inflate_releasing_children(object_id: str, object_contents: dict[str, bytes]) -> Any:
    """The object ``object_id`` inflated from ``object_contents``, as Flower inflates it.

    Every object's content leaves ``object_contents`` when it is inflated (Flower's
    ``keep_object_contents=False``), and every inflated object leaves the memo once the
    last object that lists it as a child has been inflated.

    Parameters
    ----------
    object_id : str
        The root object's id.
    object_contents : dict[str, bytes]
        Deflated contents by object id; all the root's descendants must be there.

    Returns
    -------
    InflatableObject
        The inflated root object.
    """
    parents: Counter[str] = Counter()
    for content in object_contents.values():
        parents.update(get_object_head_values_from_object_content(content)[1])
    memo: dict[str, Any] = {}
    freed = [0]  # contents' bytes let go of since memory was last returned

    def inflate(oid: str) -> Any:
        if oid in memo:
            return memo[oid]
        content = object_contents.pop(oid)
        obj_type, children_ids, _ = get_object_head_values_from_object_content(content)
        children = {child: inflate(child) for child in children_ids}
        obj = inflatable_class_registry[obj_type].inflate(content, children=children)
        freed[0] += len(content)
        del content, children  # the parent's copy of its children is all that stays
        for child in children_ids:
            parents[child] -= 1
            if parents[child] == 0:
                memo.pop(child, None)
        if freed[0] >= TRIM_EVERY:
            return_freed_memory()
            freed[0] = 0
        memo[oid] = obj
        return obj

    return inflate(object_id)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim(0)``).

    A message's objects and arrays are a few MB each: glibc serves them from its heaps, not
    from mappings of their own (its mmap threshold rises to the largest block freed, 5 MB
    chunks here), and keeps the pages when they are freed. Flower pulls a message's objects
    in worker threads, whose heaps the inflation, in the main thread, cannot reuse; and a
    node loads each received segment into storage written for the first time. Without this
    a process holds the freed pages and the new ones together (SmolLM2-135M, a first visit:
    about one more copy of the 405 MiB message). A no-op where the C library has no
    ``malloc_trim``.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
