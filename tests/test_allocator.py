"""loraplex.allocator: glibc's heap is kept for reuse once per process, and LORAPLEX_MALLOC=system opts out."""

import ctypes.util
import sys

import pytest

from loraplex import allocator


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(sys, "platform", "linux")
    return calls


def test_keep_heap_sets_mmap_and_trim_thresholds_once(fresh, monkeypatch):
    monkeypatch.delenv("LORAPLEX_MALLOC", raising=False)
    assert allocator.keep_heap() is True
    assert allocator.keep_heap() is True
    assert fresh == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
                     (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


def test_system_allocator_is_left_alone(fresh, monkeypatch):
    monkeypatch.setenv("LORAPLEX_MALLOC", "system")
    assert allocator.keep_heap() is False
    assert fresh == []


def test_libc_without_mallopt(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("LORAPLEX_MALLOC", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())  # no mallopt symbol
    assert allocator.keep_heap() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="glibc")
def test_real_glibc_accepts_the_settings(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("LORAPLEX_MALLOC", raising=False)
    assert allocator.keep_heap() is True
