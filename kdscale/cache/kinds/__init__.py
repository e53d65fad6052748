"""Target kinds, one module each, behind one registry: nothing outside this package names a kind.

Adding a kind: a module here with a :class:`~kdscale.cache.kinds.base.TargetKind` subclass, its
entry in ``KINDS``, its name in the ``kind`` literals of ``config.TargetsSpec`` and
``cache.format.TargetsInfo`` (the YAML and manifest schemas), and its tests (see CONTRIBUTING.md).
"""

from __future__ import annotations

from kdscale.cache.kinds.base import TargetKind
from kdscale.cache.kinds.full import Full
from kdscale.cache.kinds.sampled import Sampled
from kdscale.cache.kinds.stratified import Stratified
from kdscale.cache.kinds.topk import TopK

KINDS: dict[str, TargetKind] = {k.name: k for k in (Sampled(), TopK(), Stratified(), Full())}


def kind(name: str) -> TargetKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown target kind {name!r} (known: {', '.join(KINDS)})") from None
