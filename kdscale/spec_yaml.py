"""Parse a job spec's YAML safely: UTF-8 only, no duplicate keys, no alias bombs, no tags that run code.

PyYAML's ``safe_load`` already refuses ``!!python`` tags, but it silently keeps the *last* of two
equal keys (a spec with ``lr`` twice trains with whichever came second) and expands aliases
without limit ("billion laughs": nine nested aliases of nine items make 10^9 nodes from 1 KB).
We compose the node graph first, measure what it would expand to, and only then construct it.
"""

from __future__ import annotations

from typing import Any

import yaml

# A real job spec has a few hundred nodes; the largest shipped one has < 300.
MAX_EXPANDED_NODES = 100_000


class SpecYamlError(ValueError):
    """The text is not a job spec kdscale will read; the message says where and why."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SpecYamlError(
                    f"duplicate key {key!r} at line {line} (first at line {seen[key].start_mark.line + 1})"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the graph expands to once every alias is replaced by a copy of its anchor."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_EXPANDED_NODES + 1  # a recursive alias counts as unbounded
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_EXPANDED_NODES + 1)
    return memo[id(node)]


def load_spec_yaml(data: bytes) -> Any:
    """The YAML document in ``data``, or a :class:`SpecYamlError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecYamlError(f"not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise SpecYamlError(
                f"anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} nodes; "
                "a job spec is far smaller (refusing an alias bomb)"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise SpecYamlError(f"not valid YAML: {e}") from None
    finally:
        loader.dispose()
