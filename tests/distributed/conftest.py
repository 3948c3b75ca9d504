"""Markers of the distributed tests (the worker harness lives in harness.py)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "four: uses the 4-rank Megatron layouts (TP=4, TP=2 x DP=2)")
