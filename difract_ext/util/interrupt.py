"""Ctrl-C at a safe point: a first SIGINT waits for the loop's next check, a second one does not."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

from typing_extensions import Self

logger = logging.getLogger(__name__)


class DeferredInterrupt:
    """Inside ``with DeferredInterrupt() as stop:``, the first SIGINT only sets ``stop.requested``
    (the loop checks it where its state is consistent, saves, and raises ``KeyboardInterrupt``);
    a second SIGINT raises ``KeyboardInterrupt`` at once.

    Inactive (SIGINT behaves as usual) when ``enabled`` is False, outside the main thread, or when
    someone else already replaced Python's default SIGINT handler.
    """

    def __init__(self, enabled: bool = True, what: str = "stopping after the current step") -> None:
        self.enabled, self.what = enabled, what
        self.requested = False
        self._previous: object = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt received: %s (Ctrl-C again to stop at once)", self.what)

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    def install(self) -> None:
        """Start deferring SIGINT (see the class docstring)."""
        self.requested = False
        if (
            self.enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    def restore(self) -> None:
        """Give SIGINT its previous handler back."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False


__all__ = ["DeferredInterrupt"]
