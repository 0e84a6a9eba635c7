"""Whether objects of ours are freed by reference counting, or left to the cyclic collector.

    with only_reference_counting(("parsers.",)) as left_to_the_collector:
        ...  # make a connection's objects and let go of them
        assert left_to_the_collector() == []

Inside the block the cyclic collector does not run. ``left_to_the_collector()``
runs it once, saving what it finds, and names the types of ours among them.
Objects of ours alive when the block began are held until it ends, so one that
an earlier test lets go of meanwhile is not blamed on this one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def only_reference_counting(modules: tuple[str, ...]) -> Iterator[Callable[[], list[str]]]:
    def ours(o: object) -> bool:
        module = type(o).__module__  # a type's own __module__ may be a descriptor
        return isinstance(module, str) and module.startswith(modules)

    def left_to_the_collector() -> list[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            return sorted({type(o).__qualname__ for o in gc.garbage if ours(o)})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    gc.collect()
    earlier = [o for o in gc.get_objects() if ours(o)]
    gc.disable()
    try:
        yield left_to_the_collector
    finally:
        gc.enable()
        del earlier
