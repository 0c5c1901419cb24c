"""The fixtures every attack file shares: the base models saved once, and the two children that
load every crafted file of the session (attack_kit.py says how).

Each test_attack_*.py file lists its attack class as `ATTACKS`; the children load the attacks of
every such file collected in this session (all of them in a full run, one file's when pytest is
given that file), once per session (once per xdist worker).
"""

import os

import pytest

from attack_kit import Saved, run_children, save_bases


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> Saved:
    """Every base model saved once per backend, with its predictions on X."""
    return save_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="session")
def runs(request, saved, tmp_path_factory) -> dict:
    """The two children, run side by side, over the `ATTACKS` of every collected attack file."""
    here = os.path.dirname(os.path.abspath(__file__))
    modules = {
        item.module
        for item in request.session.items
        if getattr(item, "module", None) is not None
        and os.path.dirname(os.path.abspath(item.module.__file__)) == here
    }
    attacks = [
        attack
        for module in sorted(modules, key=lambda m: m.__name__)
        for attack in getattr(module, "ATTACKS", ())
    ]
    return run_children(saved, attacks, tmp_path_factory)


@pytest.fixture(scope="session")
def main_run(runs):
    return runs["main"]


@pytest.fixture(scope="session")
def memory_run(runs):
    return runs["memory"]
