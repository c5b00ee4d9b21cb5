"""A bounded YAML loader for recipes: plain data only, refused at the door when it is hostile.

``yaml.safe_load`` already builds no objects that run code, but it keeps the last of two duplicate
keys silently, follows recursive aliases (``&a [*a]``) into self-containing lists, lets an alias bomb
grow exponentially once something walks the result, recurses once per nesting level, and accepts
``!!set``/``!!binary``/``!!omap`` where a recipe only has mappings, lists and scalars. PyYAML has no
options for any of that, and no maintained library does all of it over PyYAML's API (ruamel.yaml
refuses duplicates but not alias bombs), so this is a small subclass of ``yaml.SafeLoader`` that counts
while it composes: every problem is a ``yaml.MarkedYAMLError`` with a line and column, raised before
any large structure exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

from compress.errors import RecipeError

MAX_BYTES = 1 << 20  # a recipe is a few kB; a megabyte is a mistake (a data file passed as the recipe)
MAX_DEPTH = 40  # recipes nest ~6 levels; far below Python's recursion limit in the composer
MAX_NODES = 100_000  # scalars, lists and mappings after expanding every alias


class Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that a recipe may not hold (duplicate key, alias bomb, deep nesting, odd tag)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, recursive aliases, alias bombs, deep nesting and
    tags beyond null/bool/int/float/str/list/map. Dates stay strings (a recipe has no date fields)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # nodes composed so far, aliases counted at their expanded size
        self._sizes: dict[str, int] = {}  # anchor -> expanded size of its node
        self._open: set[str] = set()  # anchors whose node is still being composed

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open:
                raise Refused(None, None, f"recursive alias *{event.anchor} (a list or mapping that "
                                                "contains itself)", event.start_mark)
            self._count(self._sizes.get(event.anchor, 0), event.start_mark)
            return super().compose_node(parent, index)
        event = self.peek_event()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        start, anchor = self._nodes, event.anchor
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        self._count(1, event.start_mark)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._nodes - start
        self._depth -= 1
        return node

    def _count(self, n: int, mark) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise Refused(None, None, f"more than {MAX_NODES} values once aliases are expanded "
                                            "(an alias bomb?)", mark)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' keys may be overridden by explicit ones, as YAML intends
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable key: the base class reports it with its position
                if first is not key_node:
                    raise Refused(None, None, f"duplicate key {key!r} (first given at line "
                                                       f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def _refuse_tag(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise Refused(None, None, f"the tag {tag} is not allowed in a recipe; write a list, "
                                           "a mapping or a plain value", node.start_mark)


for _tag in ("set", "omap", "pairs", "binary"):
    BoundedSafeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", BoundedSafeLoader._refuse_tag)
BoundedSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def loads(text: str) -> Any:
    """Parse YAML text with the bounds above; raises ``Refused`` past them, else ``yaml.YAMLError`` on bad syntax."""
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 (a SafeLoader subclass)


def _line_col(data: bytes | str, offset: int) -> str:
    head = data[:offset]
    nl = b"\n" if isinstance(head, bytes) else "\n"
    line = head.count(nl) + 1
    return f"line {line}, column {offset - (head.rfind(nl) + 1) + 1}"


def load_file(path: str | Path) -> Any:
    """Read and parse a recipe file; every problem is one ``RecipeError`` line naming the file and position."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"{path}: no such recipe file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise RecipeError("", f"{path}: {size} bytes is too large for a recipe (at most {MAX_BYTES}); "
                                  "is it the right file?")
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError("", f"{path}: cannot read it ({exc.strerror or exc})") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RecipeError("", f"{path}: the file is UTF-16 text; save the recipe as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError("", f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at {_line_col(data, exc.start)}); "
                              "save the recipe as UTF-8") from None
    try:
        return loads(text)
    except Refused as exc:  # well-formed, but not what a recipe may hold
        mark = exc.problem_mark
        raise RecipeError("", f"{path}, line {mark.line + 1}, column {mark.column + 1}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError("", f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as exc:  # a control character such as NUL: binary data
        raise RecipeError("", f"{path}: not valid YAML at {_line_col(text, exc.position)}: character "
                              f"#x{exc.character:04x} is not allowed (is it a binary file?)") from None
    except yaml.YAMLError as exc:
        raise RecipeError("", f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
