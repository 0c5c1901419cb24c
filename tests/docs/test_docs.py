"""The documentation cannot rot: every code block of the docs is executed or checked.

- Every ```python block of a page (`docs/*.md` and `README.md`) runs, in page order, in one
  fresh Python process per page, in a temporary working directory (pages that save files leave
  nothing in the repository). Tracebacks point at the Markdown file and line. The process gets
  the environment of a user's shell, but for XLA's faster unoptimized compiles (the suite's
  `--xla_backend_optimization_level=0`; not its 8 CPU devices).
- Directives, as HTML comments (invisible on the site and on GitHub):
  `<!-- docs-test: backend=torch -->` anywhere in a page runs that page with
  `KERAS_BACKEND=torch`, in the torch pytest session only; `<!-- docs-test: new-process -->`
  just before a block starts a new process from that block on (e.g. a block that must run
  before JAX is initialized); `<!-- docs-test: output -->` just before a non-python block says
  the block is what the python block before it prints (compared with doctest's checker,
  normalizing whitespace; `...` matches anything); `<!-- docs-test: raises -->` just before a
  python block says the block must raise: `ExceptionType: message` is what it prints, and an
  output block after it holds the message the page shows (the Troubleshooting page's messages
  are checked against the code this way); `<!-- docs-test: warns -->` likewise prints each
  warning the block issues as `Category: message` (deprecation warnings aside). Pages
  without a backend run with `KERAS_BACKEND=jax`, once, in the jax session.
- Other blocks (```bash, plain ```) are not run, but every `make X` they (or inline code) name
  must be a Makefile target, and every repository path named anywhere outside python blocks
  (`examples/...`, `benchmarks/...`, ...) must exist.
- The `>>>` examples in the public API's docstrings (rendered on the API reference page) run
  with doctest, in the jax session (they show JAX-backend output).
"""

import doctest
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

import flaxlayer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
TIMEOUT = 540  # seconds per process; pytest-timeout stops the whole test at 600
RUN_ONCE = "docs pages are executed once, in the jax session"
# Pages whose code is known to fail, with the reason. Strict: once the page is fixed, its test
# fails (XPASS) until the entry is removed.

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)\s*-->")
RUN_LANGUAGES = {"python", "py"}
CHECK_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}
REPO_PATH = re.compile(
    r"(?<![\w/.<>-])((?:examples|benchmarks|docs|src|tests)/[\w.-]+(?:/[\w.-]+)*)(?![\w/<>])"
)
MAKE_TARGET = re.compile(r"\bmake\s+([a-z][\w-]*)")
MAKE_IN_PROSE = re.compile(r"`make\s+([a-z][\w-]*)[^`]*`")

# Runs the blocks in the process's __main__ namespace, as one script would (a class defined in
# a block is `__main__.Name`, as in a user's script). Each block is compiled with the Markdown
# file's name and line offset, so a traceback shows the failing line of the page.
# A marker line is printed before each block, to attribute the output to blocks.
MARKER = "\x1edocs-test block "
# A block marked `raises` prints its exception instead of failing, and NO_EXCEPTION if it does
# not raise; a block marked `warns` prints the warnings it issues.
NO_EXCEPTION = "(the block raised no exception)"
RUNNER = (
    "import json as _json, sys as _sys, warnings as _warnings\n"
    "for _path, _line, _code, _mode in _json.load(open(_sys.argv[1])):\n"
    f"    print({MARKER!r} + str(_line), flush=True)\n"
    "    _code = compile('\\n' * (_line - 1) + _code, _path, 'exec')\n"
    "    if _mode == 'raises':\n"
    "        try:\n"
    "            exec(_code)\n"
    "        except Exception as _e:\n"
    "            print(f'{type(_e).__name__}: {_e}')\n"
    "        else:\n"
    f"            print({NO_EXCEPTION!r})\n"
    "    elif _mode == 'warns':\n"
    "        with _warnings.catch_warnings(record=True) as _caught:\n"
    "            _warnings.simplefilter('always')\n"
    "            _warnings.simplefilter('ignore', DeprecationWarning)\n"
    "            _warnings.simplefilter('ignore', PendingDeprecationWarning)\n"
    "            exec(_code)\n"
    "        for _w in _caught:\n"
    "            print(f'{_w.category.__name__}: {_w.message}')\n"
    "    else:\n"
    "        exec(_code)\n"
)
MODES = ("raises", "warns")


class Block:
    def __init__(self, language: str, line: int, code: str, directives: set[str]):
        self.language, self.line, self.code = language, line, code
        self.new_process = "new-process" in directives
        self.is_output = "output" in directives
        self.mode = next((m for m in MODES if m in directives), None)


def parse(path: Path) -> tuple[list[Block], dict[str, str], str]:
    """The page's fenced blocks, its page-level directives, and its text outside code blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, prose, directives = [], [], {}
    pending: set[str] = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            for d in DIRECTIVE.finditer(lines[i]):
                for word in d.group("body").split():
                    if word in ("new-process", "output", *MODES):
                        pending.add(word)
                    elif "=" in word:
                        key, value = word.split("=", 1)
                        directives[key] = value
                    else:
                        raise AssertionError(f"{path.name}:{i + 1}: unknown directive {word!r}")
            prose.append(lines[i])
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        language = m.group("info").split()[0].lower() if m.group("info").strip() else ""
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start}: unclosed code block"
        i += 1
        blocks.append(Block(language, start + 1, "\n".join(body) + "\n", pending))
        pending = set()
    return blocks, directives, "\n".join(prose)


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.language in RUN_LANGUAGES for b in parse(p)[0])]


def segments(blocks: list[Block]) -> list[list[Block]]:
    """The python blocks, split where a block asks for a new process."""
    out: list[list[Block]] = []
    for block in blocks:
        if block.language not in RUN_LANGUAGES:
            continue
        if not out or block.new_process:
            out.append([])
        out[-1].append(block)
    return out


def child_env(backend: str) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    # The suite's faster compiles only (no CPU devices): a page that needs several CPU
    # devices sets XLA_FLAGS itself, as a user's script does.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def expected_outputs(page: Path, blocks: list[Block]) -> dict[int, Block]:
    """{line of a python block: the output block that follows it}."""
    expected = {}
    for before, block in itertools.pairwise(blocks):
        if block.is_output:
            assert before.language in RUN_LANGUAGES and not before.is_output, (
                f"{page_id(page)}:{block.line}: an output block must follow a python block"
            )
            expected[before.line] = block
    return expected


def outputs_by_block(stdout: str) -> dict[int, str]:
    out = {}
    for chunk in stdout.split(MARKER)[1:]:
        line, _, text = chunk.partition("\n")
        out[int(line)] = text
    return out


def check_output(page: Path, block: Block, got: str) -> str | None:
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    if checker.check_output(block.code, got, flags):
        return None
    return (
        f"{page_id(page)}:{block.line}: the block above prints something else.\n"
        f"--- the page shows ---\n{block.code}--- the code printed ---\n{got}"
    )


@pytest.mark.parametrize("page", python_pages(), ids=page_id)
def test_page_python_blocks_run(page, tmp_path):
    blocks, directives, _ = parse(page)
    backend = directives.get("backend")
    if backend is not None:
        assert backend in ("jax", "tensorflow", "torch"), f"{page.name}: unknown backend {backend}"
        if keras.backend.backend() != backend:
            pytest.skip(f"this page declares backend={backend}: it runs in the {backend} session")
    elif keras.backend.backend() != "jax":
        pytest.skip(RUN_ONCE)

    expected = expected_outputs(page, blocks)
    unchecked = [b.line for b in blocks if b.mode and b.line not in expected]
    assert not unchecked, (
        f"{page_id(page)}: the blocks at lines {unchecked} are marked raises/warns but no "
        "output block follows them with the message to check"
    )
    problems = []
    for n, segment in enumerate(segments(blocks)):
        spec = tmp_path / f"blocks_{n}.json"
        spec.write_text(json.dumps([[str(page), b.line, b.code, b.mode] for b in segment]))
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, str(spec)],
            cwd=tmp_path,
            env=child_env(backend or "jax"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if result.returncode != 0:
            lines = ", ".join(str(b.line) for b in segment)
            pytest.fail(
                f"{page_id(page)}: the python blocks at lines {lines} failed "
                f"(exit code {result.returncode}).\n--- stdout (end) ---\n{result.stdout[-3000:]}"
                f"\n--- stderr (end) ---\n{result.stderr[-6000:]}",
                pytrace=False,
            )
        printed = outputs_by_block(result.stdout)
        for block in segment:
            if block.line in expected:
                problems.append(check_output(page, expected[block.line], printed[block.line]))
    problems = [p for p in problems if p]
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_other_blocks_name_real_targets_and_paths(page):
    if keras.backend.backend() != "jax":
        pytest.skip(RUN_ONCE)
    blocks, _, prose = parse(page)
    unknown = [b.language for b in blocks if b.language not in RUN_LANGUAGES | CHECK_LANGUAGES]
    assert not unknown, (
        f"{page_id(page)}: code blocks in {sorted(set(unknown))} are neither executed nor "
        "checked; use ```python (executed) or ```bash / ``` (checked)"
    )
    targets = makefile_targets()
    checked = [b.code for b in blocks if b.language in CHECK_LANGUAGES]
    named = [name for code in checked for name in MAKE_TARGET.findall(code)]
    named += MAKE_IN_PROSE.findall(prose)  # `make docs` in a sentence
    problems = [f"`make {name}` is not a Makefile target" for name in named if name not in targets]
    problems += [
        f"{path} does not exist"
        for text in [*checked, prose]
        for path in REPO_PATH.findall(text)
        if not (ROOT / path).exists()
    ]
    assert not problems, f"{page_id(page)}:\n  " + "\n  ".join(problems)


SAMPLE_PAGE = """# A page
<!-- docs-test: backend=torch -->

```python
x = 1
```

<!-- docs-test: output -->
```text
1
```

- an item, with a fence inside it:

    ```bash
    make docs
    ```

<!-- docs-test: new-process -->
```python
print(2)
```
"""


def test_the_parser_reads_blocks_directives_and_prose(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(SAMPLE_PAGE)
    blocks, directives, prose = parse(page)
    assert directives == {"backend": "torch"}
    assert [(b.language, b.line, b.code) for b in blocks] == [
        ("python", 5, "x = 1\n"),
        ("text", 10, "1\n"),
        ("bash", 16, "make docs\n"),
        ("python", 21, "print(2)\n"),
    ]
    assert [b.is_output for b in blocks] == [False, True, False, False]
    assert [[b.line for b in segment] for segment in segments(blocks)] == [[5], [21]]
    assert set(expected_outputs(page, blocks)) == {5}
    assert "an item" in prose
    assert "x = 1" not in prose


def test_output_attribution_and_comparison(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(SAMPLE_PAGE)
    blocks, _, _ = parse(page)
    printed = outputs_by_block(f"{MARKER}5\n1\n{MARKER}21\n2\n")
    assert printed == {5: "1\n", 21: "2\n"}
    assert check_output(page, blocks[1], printed[5]) is None
    assert "prints something else" in check_output(page, blocks[1], "2\n")


def test_raises_and_warns_blocks_print_what_they_raise_and_warn(tmp_path):
    spec = tmp_path / "blocks.json"
    blocks = [
        ["page.md", 1, "raise ValueError('bad `x`')\n", "raises"],
        ["page.md", 2, "x = 1\n", "raises"],
        ["page.md", 3, "import warnings\nwarnings.warn('careful')\n", "warns"],
        ["page.md", 5, "print(x)\n", None],
    ]
    spec.write_text(json.dumps(blocks))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec)], capture_output=True, text=True, check=True
    )
    assert outputs_by_block(result.stdout) == {
        1: "ValueError: bad `x`\n",
        2: NO_EXCEPTION + "\n",
        3: "UserWarning: careful\n",
        5: "1\n",
    }


def test_performance_page_embeds_every_section_of_the_benchmark_results():
    """The Performance page includes the "results" snippet section of benchmarks/results.md
    (`make bench` writes the markers); every section heading and no image link lies inside it
    (the chart link is relative to benchmarks/, so the page shows docs/assets/results.png)."""
    if keras.backend.backend() != "jax":
        pytest.skip(RUN_ONCE)
    results = (ROOT / "benchmarks" / "results.md").read_text(encoding="utf-8").split("\n")
    page = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert '--8<-- "benchmarks/results.md:results"' in page
    start = results.index("<!-- --8<-- [start:results] -->")
    end = results.index("<!-- --8<-- [end:results] -->")
    inside, outside = results[start:end], results[:start] + results[end:]
    assert not [line for line in outside if line.startswith("## ")], "a section is not on the page"
    assert not [line for line in inside if line.lstrip().startswith("![")], "an image link"
    assert (ROOT / "docs" / "assets" / "results.png").is_file()


def api_doctests() -> list[doctest.DocTest]:
    """Doctests of the public classes and their public methods and properties, their own or
    from flaxlayer's private bases (each function once)."""
    finder = doctest.DocTestFinder(recurse=False)
    tests, seen = [], set()
    for name in flaxlayer.__all__:
        cls = getattr(flaxlayer, name)
        if not isinstance(cls, type):
            continue
        objects = {name: cls}
        private_bases = [
            k
            for k in cls.__mro__[1:]
            if k.__module__.startswith("flaxlayer.") and k.__name__ not in flaxlayer.__all__
        ]
        for klass in (cls, *private_bases):
            for member, value in vars(klass).items():
                value = getattr(value, "fget", None) or value
                if not member.startswith("_") and id(value) not in seen:
                    seen.add(id(value))
                    objects[f"{name}.{member}"] = value
        for qualname, obj in objects.items():
            tests += finder.find(obj, f"flaxlayer.{qualname}", globs={name: cls})
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("test", api_doctests(), ids=lambda t: t.name)
def test_api_docstring_examples(test):
    if keras.backend.backend() != "jax":
        pytest.skip("the docstring examples show JAX-backend output; they run in the jax session")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


def test_every_public_class_has_a_docstring_example():
    names = {t.name for t in api_doctests()}
    for name in flaxlayer.__all__:
        if isinstance(getattr(flaxlayer, name), type):
            assert f"flaxlayer.{name}" in names, f"flaxlayer.{name} has no >>> example"
