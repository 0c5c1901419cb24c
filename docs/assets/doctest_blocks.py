"""Griffe extension for the API reference: render doctest runs as code.

Our docstrings follow Keras's convention: an `Example:` line, a blank line,
then `>>>` lines at the docstring's own indentation. Google-style parsing only
treats *indented* lines after `Example:` as an examples section, so these runs
would reach Markdown as text, where `>>>` is a nested block quote. This
extension wraps each such run (from a `>>>` line to the next blank line) in a
```pycon fence before the docstring is parsed, and drops `# doctest: +FLAG`
comments from it (as mkdocstrings does for a Google examples section).
Indented examples (a proper Google `Examples:` section) and fenced code are
left alone.

Loaded by mkdocs.yml (mkdocstrings' `extensions` option); not part of the
built site.
"""

import re

import griffe

DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:\s*[+-]\w+(?:\s*,\s*[+-]\w+)*\s*$")


def fence_doctest_runs(text: str) -> str:
    """Wraps each unindented run of `>>>` lines (and output) in a fence."""
    out: list[str] = []
    in_fence = in_run = False
    for line in text.splitlines():
        if in_run and not line.strip():
            out.append("```")
            in_run = False
        if not in_run and line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_run and line.startswith(">>>"):
            out.append("```pycon")
            in_run = True
        out.append(DOCTEST_FLAGS.sub("", line) if in_run else line)
    if in_run:
        out.append("```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctest_runs(obj.docstring.value)
