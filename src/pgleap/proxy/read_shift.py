"""Gradual shift: while the upgrade mirrors, `read_shift_percent` of the read-only sessions read from the
target, so the new server takes real read traffic before it takes the writes.

A session is read-only when it says so at login: `default_transaction_read_only=on` as a startup
parameter or in `options` (`-c default_transaction_read_only=on`), as a driver's read-only pool does.
PostgreSQL then refuses its writes on the target itself, in functions too. What could turn it read-write
(SET ... READ WRITE, `default_transaction_read_only`, `transaction_read_only`) closes the session before
it reaches the target: a write there would be in neither the source nor the change log.

Reads on the target lag the source by replay's lag, like reads on a hot standby. The shift ends when the
upgrade leaves mirroring (cutover, rollback, an error): each shifted session moves to the route's server
at its next transaction boundary, or at once when idle.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

from pgleap.protocol import codes
from pgleap.protocol.messages import error_response
from pgleap.proxy.forward import Forwarder
from pgleap.proxy.route import READ_SHIFT_ROLE

log = logging.getLogger(__name__)

_TRUE = {"on", "true", "yes", "1"}
_OPTION = re.compile(r"(?:-c\s*|--)default_transaction_read_only=(\S+)", re.IGNORECASE)
# Anything that can make a transaction read-write; matched on the raw bytes of what the client sends.
_TURNS_READ_WRITE = re.compile(rb"read\s+write|transaction_read_only", re.IGNORECASE)
_LONGEST = 64  # bytes of one chunk kept to match across the next (the keywords, with spacing)
READ_SHIFT_PHASES = ("mirroring", "cutover_ready")  # upgrade phases in which the shift is on


def read_only_session(params: dict[str, str]) -> bool:
    """Whether the startup parameters make every transaction of the session read-only."""
    value = params.get("default_transaction_read_only")
    if value is None:
        found = _OPTION.findall(params.get("options", ""))
        value = found[-1] if found else None
    return value is not None and value.lower() in _TRUE


def chosen(percent: float) -> bool:
    """Whether one more read-only session goes to the target, `percent` of the time."""
    return percent > 0 and random.random() * 100 < percent


class ReadShiftForwarder(Forwarder):
    """A read-only session on the target while the upgrade mirrors: forwarded as usual, never captured
    (it writes nothing), and closed if it tries to become read-write."""

    _tail = b""  # the end of the previous chunk: a keyword may straddle two reads

    def from_client(self, data: bytes) -> None:
        """Refuse what could turn the session read-write; forward the rest."""
        window, self._tail = self._tail + data, data[-_LONGEST:]
        if self.session.server_role == READ_SHIFT_ROLE and _TURNS_READ_WRITE.search(window):
            log.warning("session %s: a read-only session on the target tried to turn read-write", self.session.id)
            self.stats.client_errors += 1
            self.close(
                error_response(
                    "pgleap sends this read-only session to the new server while the upgrade is validated, and "
                    "it may not turn read-write there",
                    codes.FEATURE_NOT_SUPPORTED,
                    "FATAL",
                    hint="connect without default_transaction_read_only to write, or set read_shift_percent = 0",
                )
            )
            return
        super().from_client(data)

    def _switch_capture(self, capture: Any) -> None:
        if self.session.server_role == READ_SHIFT_ROLE:
            self.capture = capture  # nothing to capture on the target, but the session is up to date
        else:
            super()._switch_capture(capture)

    def end_shift(self) -> None:
        """Move to the route's server at the next boundary (at once when idle), as any session."""
        self.route_version = -1
        self.capture = None
        self.adopt_changes()
