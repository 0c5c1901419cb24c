"""The package as a user installs it: the wheel's contents and metadata, the extras README
documents, and the lowest supported versions (pyproject.toml's lower bounds) being the ones
this suite runs on (constraints.txt, which `make venv` installs with)."""

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(?P<spec>.*)$")


def requirements() -> dict[str, str]:
    """{distribution name: version specifier} over the base and every extra."""
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    out = {}
    for line in lines:
        m = REQUIREMENT.match(line)
        out[m.group("name").lower()] = m.group("spec")
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def lower_bound(spec: str) -> str | None:
    m = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    return m.group(1) if m else None


def test_constraints_pin_exactly_the_lower_bounds():
    reqs, pinned = requirements(), pins()
    for name in ("keras", "jax", "flax"):
        assert name in pinned, f"constraints.txt does not pin the base dependency {name}"
    problems = [
        f"{name}: constraints.txt pins {version}, pyproject.toml's lower bound is "
        f"{lower_bound(reqs[name])}"
        for name, version in pinned.items()
        if name in reqs and lower_bound(reqs[name]) != version
    ]
    assert not problems, "\n".join(problems)
    # jaxlib is not a requirement of ours but must match jax.
    assert pinned.get("jaxlib") == pinned["jax"]


def test_the_suite_runs_on_the_pinned_versions():
    problems = []
    for name, version in pins().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # an extra this environment does not have
        if installed.split("+")[0] != version:
            problems.append(f"{name} {installed} is installed, constraints.txt pins {version}")
    assert not problems, "run `make venv` again:\n" + "\n".join(problems)


def test_readme_documents_every_extra():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install") :]
    install = install[: install.index("<!-- --8<-- [end:install] -->")]
    missing = [
        extra
        for extra in PYPROJECT["project"]["optional-dependencies"]
        if f".[{extra}]" not in install and f"`{extra}`" not in install
    ]
    assert not missing, f"README's Install section does not mention the extras {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if keras.backend.backend() != "jax":
        pytest.skip("the wheel is built once, in the jax session")
    if shutil.which("twine", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the dev extra (build, twine) is not installed")
    # A copy of what the sdist holds, so that building leaves nothing in the repository.
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("*.whl"))


def test_wheel_holds_every_module_and_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(ROOT / "src").as_posix()
        for p in (ROOT / "src" / "flaxlayer").rglob("*")
        if p.suffix in (".py", ".typed")
    }
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert "flaxlayer/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]


def test_wheel_metadata_declares_dependencies_extras_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())
    assert meta["Name"] == "flaxlayer"
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"
    extras = set(meta.get_all("Provides-Extra"))
    assert extras == set(PYPROJECT["project"]["optional-dependencies"])
    requires = meta.get_all("Requires-Dist")
    for dependency in PYPROJECT["project"]["dependencies"]:
        assert dependency in requires


def test_twine_accepts_the_wheel(wheel):
    twine = Path(sys.executable).parent / "twine"
    result = subprocess.run(
        [str(twine), "check", "--strict", str(wheel)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_demo_installs_only_the_package_and_the_demo_extra():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile[makefile.index("$(DEMO_STAMP):") :].split("\n\n", 1)[0]
    installs = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert installs == ['$(BIN)/pip install -e ".[demo]" -c constraints.txt'], installs
    assert re.search(r"^demo: \$\(DEMO_STAMP\)$", makefile, flags=re.M)
    demo = PYPROJECT["project"]["optional-dependencies"]["demo"]
    assert [REQUIREMENT.match(r).group("name") for r in demo] == ["scikit-learn"]


def test_version_is_read_from_the_package_metadata():
    import flaxlayer

    assert flaxlayer.__version__ == PYPROJECT["project"]["version"] == md.version("flaxlayer")
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "src").rglob("*.py"))
    assert PYPROJECT["project"]["version"] not in sources, "a second copy of the version"
