"""Small helpers for the payments tests."""

import time


def wait_until(condition, *, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `condition()` is truthy. The timeout is generous on purpose: it bounds a hang on a
    slow shared machine, it is not a speed assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
