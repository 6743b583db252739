"""YAML for configs and `--set` values: safe, small, and unambiguous.

PyYAML's SafeLoader runs no code, but it accepts two things a config should not have:
- aliases (`&a` / `*a`): a 1 kB file of nested aliases expands to gigabytes once validated or
  printed (the "billion laughs"); configs have no need for them, so anchors and aliases are refused
  where they appear, before anything is built;
- duplicate keys: the last one silently wins, so a second `train:` section replaces the first.

Both are refused with the line they are on. Every other problem (bad syntax, an integer too long
to convert) is a YAMLProblem too, so a caller turns any of them into one `error:` line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ganpipe.errors import shorten


class YAMLProblem(Exception):
    """Why a YAML text was refused; `line` is 1-based (None when unknown)."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None):
        super().__init__(problem)
        self.problem, self.line, self.column = problem, line, column


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases or duplicate keys (see the module doc)."""

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if self.check_event(AliasEvent):
            raise YAMLProblem(f"YAML alias '*{event.anchor}' refused: configs use no anchors or aliases",
                              event.start_mark.line + 1, event.start_mark.column + 1)
        if getattr(event, "anchor", None) is not None:
            raise YAMLProblem(f"YAML anchor '&{event.anchor}' refused: configs use no anchors or aliases",
                              event.start_mark.line + 1, event.start_mark.column + 1)
        return super().compose_node(parent, index)

    def construct_document(self, node: Node) -> Any:
        refuse_duplicate_keys(node, [])
        return super().construct_document(node)


def refuse_duplicate_keys(node: Node, path: list[str]) -> None:
    """Raise YAMLProblem at the second occurrence of a key in any mapping under `node`. Keys are
    compared as YAML resolved them (tag and text): `1` and `"1"` are different keys. Without
    aliases the nodes form a tree, so this visits each node once."""
    if isinstance(node, MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else "?"
            line = key.start_mark.line + 1
            if isinstance(key, ScalarNode):
                if (key.tag, name) in seen:
                    dotted = ".".join([*path, name])
                    raise YAMLProblem(f"duplicate key '{shorten(dotted)}' (first on line {seen[key.tag, name]})",
                                      line, key.start_mark.column + 1)
                seen[key.tag, name] = line
            refuse_duplicate_keys(value, [*path, name])
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            refuse_duplicate_keys(item, [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"])


def load(text: str) -> Any:
    """The YAML document in `text`, or YAMLProblem."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "YAML syntax error"
        raise YAMLProblem(f"YAML syntax error: {problem}", mark.line + 1 if mark else None,
                          mark.column + 1 if mark else None) from None
    except yaml.YAMLError as exc:  # e.g. the reader's "unacceptable character"
        raise YAMLProblem(f"YAML syntax error: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise YAMLProblem(f"bad value: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise YAMLProblem("nested too deeply") from None


class _TreeDumper(yaml.SafeDumper):
    """Writes shared objects out in full: a saved config must load with StrictLoader."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(data: Any) -> str:
    """`data` as YAML (keys in the given order) without anchors or aliases."""
    return yaml.dump(data, Dumper=_TreeDumper, sort_keys=False)
