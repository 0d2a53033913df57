"""`make test` runs the suite on three pytest-xdist workers (2 cores: one test's daemon decodes
while another test waits on its own). The tests that share a costly module fixture (a
daemon with the multilingual model, one per engine; a batching daemon; a PostgreSQL
server; the daemon with a token; the daemon of the conversations) stay together on one worker, so each is made once."""

import pytest

GROUPS = {"polyglot": "polyglot", "batcher": "batcher", "database": "postgres",
          "guarded": "guarded", "talker": "talker"}


def pytest_collection_modifyitems(items):
    for item in items:
        group = next((GROUPS[f] for f in GROUPS if f in item.fixturenames), None)
        if group == "polyglot":  # a daemon per engine: the two may go to two workers
            group += "-" + item.callspec.params["polyglot"]
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
