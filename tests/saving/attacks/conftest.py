"""The fixtures every attack file shares: the base models saved once, and the two children that
load every crafted file of the session (attack_kit.py says how).

Each test_attack_*.py file lists its attack class as `ATTACKS`; the children load the attacks of
every such file collected in this session (all of them in a full run, one file's when pytest is
given that file), once per session: under xdist the first worker to need them runs them and
the others read its results (the children's runs are a minute of CPU).
"""

import contextlib
import fcntl
import os
import pickle

import pytest

from attack_kit import Saved, run_children, save_bases


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> Saved:
    """Every base model saved once per session, with its predictions on X: under xdist every
    worker reads the same files, so the children's results (run by one worker) compare with
    the predictions of the files they loaded."""
    with _once_per_session(tmp_path_factory, "bases", []) as cached:
        if cached.value is None:
            cached.value = save_bases(_session_folder(tmp_path_factory, "bases"))
        return cached.value


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory) -> dict:
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
    with _once_per_session(tmp_path_factory, "attack_runs", [a.name for a in attacks]) as cached:
        if cached.value is None:
            cached.value = run_children(request.getfixturevalue("saved"), attacks, tmp_path_factory)
        return cached.value


class _Cached:
    value = None


def _session_folder(tmp_path_factory, name: str):
    """A folder every xdist worker of this session sees (this process's own without xdist)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp(name)
    folder = tmp_path_factory.getbasetemp().parent / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def _once_per_session(tmp_path_factory, key: str, names: list[str]):
    """Under xdist, the result of this session's first run of `key` for these names, shared by
    the workers through their session's temporary folder (a lock makes the others wait);
    without xdist, nothing to share."""
    cached = _Cached()
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield cached
        return
    shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    with open(shared / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = shared / f"{key}.pickle"
        if store.exists():
            stored = pickle.loads(store.read_bytes())
            cached.value = stored["runs"] if stored["names"] == sorted(names) else None
        yield cached
        if not store.exists():
            store.write_bytes(pickle.dumps({"names": sorted(names), "runs": cached.value}))


@pytest.fixture(scope="session")
def main_run(runs):
    return runs["main"]


@pytest.fixture(scope="session")
def memory_run(runs):
    return runs["memory"]
