"""Griffe extension for the API pages: the package's docstrings use a few reStructuredText
habits that Markdown renders literally. Turn them into Markdown before mkdocstrings renders:

* ``:class:`~outbox.PayloadError``` (any role) -> `` `PayloadError` ``, ``:meth:`stop``` ->
  `` `stop` `` (code spans, not links: the target may be a private module that has no page);
* a paragraph ending in ``::`` (an RST literal block follows) -> ``:``.

Double backquotes already render as code in Markdown. Loaded by mkdocs.yml; not part of the
package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`(~?)([^`]+)`")
_LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def markdown(text: str) -> str:
    return _LITERAL_BLOCK.sub(":", _ROLE.sub(_role, text))


class RstRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]
