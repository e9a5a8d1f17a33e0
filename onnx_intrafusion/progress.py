"""How long work reports how far it is, whatever is listening.

Stages call :class:`Progress` methods; the library default says nothing, the
command line plugs in a terminal renderer (tqdm bars) or a log renderer
(plain lines, throttled) so that a run whose stderr goes to a file shows
progress too.  A plain callable ``f(str)`` is accepted wherever a Progress is
(:func:`as_progress`), and a Progress is itself callable with a message, so
``progress("...")`` works on both.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Steps:
    """A counted piece of work (groups planned, layers re-fitted, epochs)."""

    def __init__(self, owner: "Progress", what: str, total: int):
        self.owner, self.what, self.total, self.done = owner, what, max(int(total), 0), 0

    def advance(self, n: int = 1, detail: str = "") -> None:
        self.done += n
        self.owner._step(self, detail)

    def __enter__(self) -> "Steps":
        self.owner._begin(self)
        return self

    def __exit__(self, *exc) -> None:
        self.owner._end(self)


class Progress:
    """Silent by default; subclasses render.  Never raises into the caller's work."""

    def stage(self, name: str) -> None:
        """A pipeline stage starts."""

    def note(self, text: str) -> None:
        """A one-off line worth showing (e.g. a wide group about to be planned)."""

    def steps(self, what: str, total: int) -> Steps:
        return Steps(self, what, total)

    def __call__(self, text: str) -> None:
        self.note(text)

    def _begin(self, steps: Steps) -> None:
        pass

    def _step(self, steps: Steps, detail: str) -> None:
        pass

    def _end(self, steps: Steps) -> None:
        pass


class CallbackProgress(Progress):
    """Every event as one string to ``callback`` (the API's ``progress=print``)."""

    def __init__(self, callback: Callable[[str], None]):
        self.callback = callback

    def stage(self, name: str) -> None:
        self.callback(f"{name} ...")

    def note(self, text: str) -> None:
        self.callback(text)

    def _end(self, steps: Steps) -> None:
        if steps.total:
            self.callback(f"  {steps.what}: {steps.done}/{steps.total}")


class LogProgress(Progress):
    """Plain lines for logs and pipes: stages, and counted work at most every ``every_s`` seconds."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0):
        self.stream, self.every_s = stream, every_s
        self._last = 0.0
        self._start = time.perf_counter()

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(f"[{time.perf_counter() - self._start:7.1f}s] {text}\n")
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: progress is best-effort
            pass

    def stage(self, name: str) -> None:
        self._write(f"{name} ...")

    def note(self, text: str) -> None:
        self._write(text.strip())

    def _begin(self, steps: Steps) -> None:
        self._last = time.perf_counter()

    def _step(self, steps: Steps, detail: str) -> None:
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._write(f"  {steps.what} {steps.done}/{steps.total}" + (f"  {detail}" if detail else ""))

    def _end(self, steps: Steps) -> None:
        if steps.total:
            self._write(f"  {steps.what} {steps.done}/{steps.total} done")


class TerminalProgress(LogProgress):
    """Stage lines plus a tqdm bar for counted work, on a terminal."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self._bars: dict[int, object] = {}

    def _begin(self, steps: Steps) -> None:
        from tqdm import tqdm

        self._bars[id(steps)] = tqdm(total=steps.total or None, desc=f"  {steps.what}", leave=False,
                                     file=self.stream or sys.stderr, dynamic_ncols=True, mininterval=0.2)

    def _step(self, steps: Steps, detail: str) -> None:
        bar = self._bars.get(id(steps))
        if bar is not None:
            bar.update(steps.done - bar.n)
            if detail:
                bar.set_postfix_str(detail, refresh=False)

    def _end(self, steps: Steps) -> None:
        bar = self._bars.pop(id(steps), None)
        if bar is not None:
            try:
                bar.close()
            except (OSError, ValueError):
                pass
        super()._end(steps)

    def note(self, text: str) -> None:
        if self._bars:
            from tqdm import tqdm

            try:
                tqdm.write(text, file=self.stream or sys.stderr)
            except (OSError, ValueError):
                pass
        else:
            super().note(text)


def as_progress(progress: Progress | Callable[[str], None] | None) -> Progress:
    """A Progress for whatever the caller gave (None = silent)."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    return CallbackProgress(progress)
