"""Progress bars for the command line: tqdm on stderr, shown only for work that takes over a
second (``force=True`` shows it at once, ``False`` never).  A bar is a ``progress(done, total)``
callable (total 0: unknown, e.g. a pipe) with ``close()``."""
from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["Bar", "bar"]


class Bar:
    def __init__(self, label: str, force: bool = False, stream: Any = None) -> None:
        from tqdm import tqdm

        self._t = tqdm(desc=label, total=None, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                       delay=0 if force else 1.0, file=stream or sys.stderr, dynamic_ncols=True,
                       mininterval=0.1)

    def __call__(self, done: int, total: int) -> None:
        t = self._t
        if total and t.total != total:
            t.total = total
        if done > t.n:
            t.update(done - t.n)

    def close(self) -> None:
        self._t.close()


def bar(label: str, force: Optional[bool] = None) -> Optional[Bar]:
    """A bar for ``label``: shown when ``force`` is True, or (``force`` None) when stderr is
    a terminal and the work lasts over a second; None when ``force`` is False."""
    if force is False or (force is None and not sys.stderr.isatty()):
        return None
    return Bar(label, force=bool(force))
