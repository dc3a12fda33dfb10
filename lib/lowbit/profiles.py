"""Run-size profiles: ``smoke`` (seconds, tests), ``default`` (CPU, `make reproduce`),
``paper`` (the papers' settings, for a GPU box).

Notebooks keep ``profile = "default"`` in their ``parameters`` cell and then call
:func:`resolve`, so the environment variable ``LOWBIT_PROFILE`` (set by the test-suite to
``smoke``) wins over the notebook's default.
"""
from __future__ import annotations

import os

PROFILES = ("smoke", "default", "paper")


def resolve(profile: str = "default") -> str:
    """The active profile: ``$LOWBIT_PROFILE`` if set, else ``profile``; validated."""
    chosen = os.environ.get("LOWBIT_PROFILE") or profile
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile {chosen!r}: use one of {PROFILES}")
    return chosen


def pick(profile: str, **by_profile):
    """``pick(p, smoke=.., default=.., paper=..)`` -> the value for profile ``p``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {PROFILES}")
    missing = [p for p in PROFILES if p not in by_profile]
    if missing:
        raise TypeError(f"pick() needs a value for every profile, missing {missing}")
    return by_profile[profile]
