"""Benchmark suites (pytest-benchmark); a package so that the suites can import the builders of conftest.py."""
