"""The access rules as the operator side keeps them (issue 19), and what of them each gateway must hold (pure).

The operator service stores areas (site-wide), per gateway the rules of its doors and its interlocks, and the
site's rule settings (`cloud_bridge/service/areas.py`); a publish hands them to the planner as one
`AccessRules` (the workspace's meta row `access_rules`). `objects_for` picks what one gateway must hold:

* the areas its doors lead into or out of (an area's `exempt_groups` cut to the groups the gateway holds: a
  group it does not hold has no member who could pass there);
* its doors with their rules (`door_of`); a door's `visitor_groups` cut the same way; its `escort_group` is
  always held (`escort_groups`: the planner sends it even without a door on the gateway, so a visitor there
  keeps waiting for an escort rather than passing alone);
* its interlocks whose doors it holds (an interlock left with fewer than two is not sent);
* the site's settings (`site_rules`), when set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from edge.model import MAX_EXEMPT_GROUPS, MAX_RULE_WINDOW_S, Area, Door, Ident, Interlock, SiteRules

#: The key of the rules in the planner's workspace (`meta`).
META_KEY = "access_rules"


class DoorRules(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The access-rule fields of one door (docs/model.md, "Access rules")."""

    to_area: Ident | None = None
    from_area: Ident | None = None
    two_person_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] | None = None
    escort_group: Ident | None = None
    visitor_groups: Annotated[list[Ident], Meta(max_length=MAX_EXEMPT_GROUPS)] = []
    escort_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] = 30.0


class GatewayRules(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    doors: dict[str, DoorRules] = {}
    interlocks: list[Interlock] = []


class AccessRules(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    areas: list[Area] = []
    gateways: dict[str, GatewayRules] = {}
    site: SiteRules | None = None


_dec = msgspec.json.Decoder(AccessRules)


def decode(text: str | bytes | None) -> AccessRules:
    return AccessRules() if not text else _dec.decode(text)


def encode(rules: AccessRules) -> str:
    return msgspec.json.encode(rules).decode()


def escort_groups(rules: AccessRules, gateway: str, doors_here: set[str]) -> set[str]:
    """The escort groups the gateway's doors name (held there whatever doors they open)."""
    g = rules.gateways.get(gateway)
    if g is None:
        return set()
    return {r.escort_group for d, r in g.doors.items() if d in doors_here and r.escort_group is not None}


def door_of(rules: AccessRules, gateway: str, door: str, name: str, groups_here: set[str]) -> Door:
    """The door as the gateway must hold it: its name and its rules."""
    g = rules.gateways.get(gateway)
    r = g.doors.get(door) if g is not None else None
    if r is None:
        return Door(id=door, name=name)
    return Door(id=door, name=name, to_area=r.to_area, from_area=r.from_area, two_person_s=r.two_person_s,
                escort_group=r.escort_group, visitor_groups=[v for v in r.visitor_groups if v in groups_here],
                escort_s=r.escort_s)  # fmt: skip


def objects_for(rules: AccessRules, gateway: str, doors_here: set[str], groups_here: set[str]
                ) -> Iterator[tuple[str, str, Any]]:  # fmt: skip
    """(kind, key, struct) of the areas, interlocks and site settings `gateway` must hold."""
    g = rules.gateways.get(gateway) or GatewayRules()
    named = {a for d, r in g.doors.items() if d in doors_here for a in (r.to_area, r.from_area) if a is not None}
    for area in sorted(rules.areas, key=lambda a: a.id):
        if area.id in named:
            yield (
                "area",
                area.id,
                msgspec.structs.replace(area, exempt_groups=[x for x in area.exempt_groups if x in groups_here]),
            )
    for il in sorted(g.interlocks, key=lambda i: i.id):
        held = [d for d in il.doors if d in doors_here]
        if len(held) >= 2:
            yield "interlock", il.id, msgspec.structs.replace(il, doors=held)
    if rules.site is not None:
        yield "site_rules", "site", rules.site
