"""Fixtures shared with the stage tests (a live local HTTP site from tests/test_crawl.py)."""

from tests.test_crawl import make_site  # noqa: F401 - re-exported as a fixture
