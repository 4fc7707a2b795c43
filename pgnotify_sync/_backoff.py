"""Exponential backoff with jitter, as a small immutable policy (after urllib3's Retry)."""

import random

import attrs


@attrs.frozen
class Backoff:
    """Delay before attempt *n* (1-based): ``first_s * 2**(n-1)``, capped at ``max_s``,
    then "equal jitter": a random value between half and all of it, so a fleet of
    listeners does not reconnect in lockstep after a server restart.

    ``max_attempts`` 0 means never give up.
    """

    first_s: float
    max_s: float
    max_attempts: int = 0

    def delay_s(self, attempt, rand=random.random):
        # The exponent is capped first: 2**1024 overflows a float, and a listener that
        # retries forever gets there after some hours at the cap.
        base = min(self.max_s, self.first_s * (2.0 ** min(max(0, attempt - 1), 60)))
        return base / 2 + rand() * base / 2

    def exhausted(self, attempt):
        """True if *attempt* failures used up the allowed attempts."""
        return self.max_attempts > 0 and attempt >= self.max_attempts
