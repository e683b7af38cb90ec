"""Load test (marker ``load``, part of the default test run): 16 users generating at once through gradio_client.

The script is tests/load_test.py (``python -m tests.load_test --requests 16`` prints the same figures).
"""

import pytest

from .app_server import AppServer
from .load_test import MAX_RSS_GROWTH, TINY_CLASSES, run_load_test

REQUESTS = 16


@pytest.mark.load
def test_concurrent_users_are_served_without_cross_talk_or_memory_growth(tmp_path):
    server = AppServer(tmp_path)  # the app's defaults: 2 generations at a time, 16 waiting
    try:
        report = run_load_test(server.url, server.process.pid, requests=REQUESTS, classes=TINY_CLASSES)
        still_up = server.process.poll() is None
    finally:
        server.stop()
    print(report.summary())
    assert still_up
    assert report.count("failed") == 0, report.problems()
    # every request is served or cleanly refused; with 2 running and 16 waiting allowed, all 16 fit
    assert report.count("served") == REQUESTS
    assert report.compared and report.mismatches == []  # each equals the same seed and class run alone
    assert report.rss_first_mib and report.rss_after_mib and report.peak_mib
    assert report.rss_growth <= MAX_RSS_GROWTH, report.summary()
