"""Makes each test's outcome readable from its fixtures (`request.node.rep_call`), so the browser tests can save a
screenshot of a failure as a test artefact."""
from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
