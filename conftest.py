"""`make test` runs the suite on three pytest-xdist workers (2 cores: one test's daemon decodes
while another test waits on its own). The tests that share a costly module fixture (a
daemon with the multilingual model, one per engine; a batching daemon; a PostgreSQL
server; the daemon with a token; the daemon of the conversations) stay together on one
worker, so each is made once."""

import warnings

import pytest

GROUPS = {"polyglot": "polyglot", "batcher": "batcher", "database": "postgres",
          "guarded": "guarded", "talker": "talker"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the marker into the group
def pytest_collection_modifyitems(items):
    for item in items:
        group = next((GROUPS[f] for f in GROUPS if f in item.fixturenames), None)
        if group == "polyglot":  # a daemon per engine: the two may go to two workers
            group += "-" + item.callspec.params["polyglot"]
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Says so when xdist did not group them (the suite still passes, but each worker then
    starts every shared daemon for itself: minutes slower)."""
    if getattr(session.config.option, "loadgroup", False) and any(
            item.get_closest_marker("xdist_group") and "@" not in item.nodeid
            for item in session.items):
        warnings.warn(pytest.PytestWarning(
            "pytest-xdist did not group the tests that share a daemon (see pyproject.toml: "
            "pytest>=9.2 with pytest-xdist 3.8); each worker starts them all"))
