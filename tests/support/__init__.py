"""Shared test support: real peers, topologies and feeding helpers."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
POLICIES = REPO / "policies"
