"""Test and benchmark harnesses (never imported by the library): a local autoscaling cluster, fault injection."""

from __future__ import annotations

import os


def skip_unless_ci(reason: str, what: str) -> None:
    """In a pytest test that CI must run: skip with ``reason`` on a developer's machine, but fail under CI (``CI``
    set), where a missing tool or a busy port would otherwise turn a test of ``what`` into a silent pass."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run {what}")
    pytest.skip(reason)
