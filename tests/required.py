"""Components some tests need (Chromium, a PostgreSQL server, mergekit): skip without them on a
laptop, fail under CI.

CI (`CI=true`, exported by .ci/run) installs every one of them, so a skip there means a broken
set-up and must fail the run instead of letting it pass with the test unexecuted.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(ok: object, component: str, reason: str) -> None:
    """Nothing when `ok`; otherwise skip the calling test (or module) with the reason, or fail it
    when CI=true."""
    if ok:
        return
    msg = f"{component}: {reason}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: a required component may not skip)", pytrace=False)
    pytest.skip(msg, allow_module_level=True)
