"""The injectable clock used by the in-memory backends.

A clock is a zero-argument callable returning seconds as a float from an arbitrary,
monotonic origin. Tests pass a fake one to control expiry without sleeping; Redis
backends use the server's clock instead, so several processes agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "monotonic"]

Clock = Callable[[], float]

monotonic: Clock = time.monotonic
