"""Helpers for the differential tests against llama-cpp-python 0.3.36 (llama.cpp 0c1e570)."""
from __future__ import annotations

from pymem._oracle.lcp_mirror import KNOWN_DIFFERENCES, LcpMirror  # noqa: F401
