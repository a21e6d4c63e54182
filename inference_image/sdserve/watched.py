"""A mounted file read again when it changes: the API keys (a Secret) and the prompt blocklist
(a ConfigMap). The kubelet updates such a volume in place, by moving a new copy into position
within about a minute, so a revoked key or an edited list applies without restarting a server
that took minutes to load its model."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("sdserve.watched")

T = TypeVar("T")

#: How often a request may look at the file (one stat call).
RECHECK_SECONDS = 5.0


class WatchedFile(Generic[T]):
    """``parse(text)`` of the file, parsed again when a look finds another file in its place
    (inode, size or modification time). The first read happens at start-up and its errors
    propagate; a later copy that cannot be read or parsed leaves the last good value."""

    def __init__(self, path: str, parse: Callable[[str], T], what: str):
        self.path, self.parse, self.what = path, parse, what
        self._stamp = self._stat()
        self._value = parse(self._read())
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # through the kubelet's symlinks, to the file in place now
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> str:
        return pathlib.Path(self.path).read_text(encoding="utf-8")

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return self._value
        self._checked = now
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return self._value
            text = self._read()
        except OSError as e:  # gone for a moment while the kubelet swaps it: look again later
            log.warning("%s: cannot read %s, keeping the last good one: %s", self.what, self.path, e)
            return self._value
        self._stamp = stamp  # a copy that does not parse is reported once, not at every look
        try:
            self._value = self.parse(text)
        except (ValueError, re.error) as e:
            log.warning("%s: %s does not parse, keeping the last good one: %s", self.what, self.path, e)
            return self._value
        log.info("%s reloaded from %s", self.what, self.path)
        return self._value
