"""What every fault test shares: the CLI run as a user runs it, from the repository, with a console's argv."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _as_from_the_console(monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo configs are named relative to the repository, as in the README
    monkeypatch.setattr(sys, "argv", ["vlm_post"])  # not pytest's argv
