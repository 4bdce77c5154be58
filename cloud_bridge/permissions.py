"""Operator permissions: who may read, provision and command which objects (pure: no I/O).

Operators belong to permission groups; a group is a list of `Permission` lines, each one an object type x a
set of actions, granted or denied, optionally limited by tag, by object (`applies_to`) and, for publish, by
command kind (`event_types`). A check answers one question, "may operator O do action A on target T?":

1. an inactive operator is denied everything; so is one that names a permission group nobody defined;
2. every line of every group of the operator that *matches* (object type, action, tag, object, kind) is
   collected; any matching deny refuses, whatever grants there are (deny wins);
3. otherwise at least one matching grant is needed ("no permission grants ...").

A line matches a target when all of these hold:

* its `object_type` is the target's type, or `all`;
* the action is one of its `actions`;
* `tags` is empty, or the target carries at least one of them;
* `applies_to` is empty, or one of its entries is one of the target's refs (below);
* `event_types` (publish only) is empty, the action is not publish, or the publish names one of them. A
  publish that names no kind (``event_type=None``) means "any kind": a kind-limited grant does not cover it,
  a kind-limited deny does.

Object refs (the strings `applies_to` lists). Gateway, group, door, ... ids are `edge.model.Ident`s, which
never contain ``/``:

* ``gw1``: gateway ``gw1`` and everything on it: its doors, its readers, users or events targeted at it;
* ``gw1/front``: door ``front`` of gateway ``gw1`` and everything of that door (its readers, its events);
* ``<type>:<object_id>``, e.g. ``user:alice``, ``schedule:office-hours``, ``gateway:gw1``,
  ``door:gw1/front``: that one object.

So a target's refs are ``"<type>:<object_id>"``, plus its gateway id when it has one, plus
``"<gateway>/<door>"`` when it has both. A door's `object_id` is its door ref ``"gw1/front"``; a reader's
should be ``"<gateway>/<reader id>"``. (A gateway id must not look like ``<object type>:...``.)

Commands (seed 003, "Unlock Door", "Update Reader Modes") need several permissions at once:
`requirements_for` lists them and `Authorizer.check_command` checks them all, naming the first one missing.
Everything here is a msgspec Struct, so the operator side stores groups and operators as JSON or msgpack.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from edge.model import Ident

from .errors import CloudBridgeError

__all__ = [
    "ALL_ACTIONS",
    "SYSTEM_ADMINISTRATOR",
    "Action",
    "Authorizer",
    "CommandKind",
    "Effect",
    "ObjectType",
    "Operator",
    "Permission",
    "PermissionDenied",
    "PermissionGroup",
    "PermissionsInvalid",
    "Requirement",
    "Target",
    "Verdict",
    "admin_except",
    "deny",
    "door_mode_group",
    "grant",
    "kind_of",
    "monitor_group",
    "requirements_for",
    "tagged_editor_group",
    "unlock_group",
]


class ObjectType(enum.StrEnum):
    GATEWAY = "gateway"
    DOOR = "door"
    READER = "reader"
    USER = "user"
    CREDENTIAL = "credential"
    GROUP = "group"
    SCHEDULE = "schedule"
    VISITOR = "visitor"
    EVENT = "event"
    BADGE_POOL = "badge_pool"
    OPERATOR = "operator"
    SITE_KEY = "site_key"
    ALL = "all"  # in a Permission only: every object type


class Action(enum.StrEnum):
    CREATE = "create"
    READ = "read"
    UPDATE = "update"
    DELETE = "delete"
    PUBLISH = "publish"  # send a command about the object (unlock, door mode, lockdown, ...)


ALL_ACTIONS: tuple[Action, ...] = tuple(Action)


class Effect(enum.StrEnum):
    GRANT = "grant"
    DENY = "deny"


class CommandKind(enum.StrEnum):
    """The command kinds of `cloud_bridge.protocol.CommandAction`, by their wire tag."""

    UNLOCK = "unlock"
    DOOR_MODE = "door_mode"
    LOCKDOWN = "lockdown"
    RESYNC = "resync"
    REBIRTH = "rebirth"
    #: OSDP reader commands: gateway-wide (read + publish(kind) on the gateway); chunks count as osdp_firmware
    OSDP_ROTATE_KEY = "osdp_rotate_key"
    OSDP_OUTPUT = "osdp_output"
    OSDP_FIRMWARE = "osdp_firmware"


class PermissionsInvalid(CloudBridgeError, ValueError):
    """A permission, target or group set is malformed (a ValueError too, so msgspec reports it on decode)."""


class PermissionDenied(CloudBridgeError):
    """An operator may not do what was asked. The message names the operator, the action and the object;
    `verdict` says why (and which permission lines matched)."""

    def __init__(
        self, operator: str, action: Action, target: Target, verdict: Verdict, *, kind: str | None = None
    ) -> None:
        super().__init__(f"operator {operator!r} may not {kind or action} {target.describe()}: {verdict.reason}")
        self.operator = operator
        self.action = action
        self.kind = kind
        self.target = target
        self.verdict = verdict


Tag = Annotated[str, Meta(min_length=1, max_length=64)]
#: Command kinds: short words, no whitespace.
Word = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
#: An `applies_to` entry: see the module docstring.
Ref = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@\-/]+$")]
OperatorId = Annotated[str, Meta(min_length=1, max_length=128)]

_TYPE_PREFIXES = tuple(f"{t}:" for t in ObjectType if t is not ObjectType.ALL)


def _check_ref(ref: str) -> None:
    if ref.startswith(_TYPE_PREFIXES):
        if not ref.partition(":")[2]:
            raise PermissionsInvalid(f"applies_to entry {ref!r} names no object")
        return
    parts = ref.split("/")
    if len(parts) > 2 or not all(parts):
        raise PermissionsInvalid(
            f"applies_to entry {ref!r} is neither a gateway id, a door ref 'gateway/door' nor 'type:id'"
        )


class _Struct(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Stored definitions: strict (an unknown field is a typo, not a newer version)."""


class Permission(_Struct, frozen=True, omit_defaults=True):
    """One line of a permission group. Empty `tags` / `applies_to` / `event_types` mean "any".

    `actions` is kept sorted and without duplicates, so equal lines compare equal."""

    object_type: ObjectType
    actions: Annotated[list[Action], Meta(min_length=1)]
    effect: Effect = Effect.GRANT
    tags: list[Tag] = []
    applies_to: list[Ref] = []
    event_types: list[Word] = []

    def __post_init__(self) -> None:
        order = {a: i for i, a in enumerate(ALL_ACTIONS)}
        msgspec.structs.force_setattr(self, "actions", sorted(set(self.actions), key=order.__getitem__))
        for ref in self.applies_to:
            _check_ref(ref)
        if self.event_types and Action.PUBLISH not in self.actions:
            raise PermissionsInvalid("event_types limit publish, but the permission does not list publish")

    def matches(self, action: Action, target: Target, event_type: str | None = None) -> bool:
        """Whether this line speaks about `action` on `target` (see the module docstring)."""
        if self.object_type is not ObjectType.ALL and self.object_type != target.object_type:
            return False
        if action not in self.actions:
            return False
        if self.tags and target.tags.isdisjoint(self.tags):
            return False
        if self.applies_to and target.refs().isdisjoint(self.applies_to):
            return False
        if self.event_types and action is Action.PUBLISH:
            if event_type is None:
                return self.effect is Effect.DENY  # "any kind": only a deny of some kinds covers part of it
            return event_type in self.event_types
        return True

    def describe(self) -> str:
        text = f"{self.effect} {self.object_type} {','.join(self.actions)}"
        if self.event_types:
            text += f" kinds={','.join(self.event_types)}"
        if self.tags:
            text += f" tags={','.join(self.tags)}"
        if self.applies_to:
            text += f" applies_to={','.join(self.applies_to)}"
        return text


def grant(object_type: ObjectType, *actions: Action, **limits: Any) -> Permission:
    """Shorthand: ``grant(ObjectType.DOOR, Action.READ, Action.PUBLISH, applies_to=["gw1/front"])``."""
    return Permission(object_type=object_type, actions=list(actions), effect=Effect.GRANT, **limits)


def deny(object_type: ObjectType, *actions: Action, **limits: Any) -> Permission:
    """Shorthand for a deny line, like `grant`."""
    return Permission(object_type=object_type, actions=list(actions), effect=Effect.DENY, **limits)


class PermissionGroup(_Struct, frozen=True):
    id: Ident
    name: str = ""
    description: str = ""
    permissions: list[Permission] = []


class Operator(_Struct, frozen=True):
    """A person or service account of the operator side. `groups` are `PermissionGroup` ids."""

    id: OperatorId
    name: str = ""
    groups: list[Ident] = []
    active: bool = True


class Target(msgspec.Struct, frozen=True):
    """The object acted upon. Build gateways and doors with `for_gateway` / `for_door`.

    `gateway` is the gateway the object lives on or is provisioned to (None for site-wide objects), `door`
    the door it belongs to (a reader, a door event). `tags` are the object's own tags (for a new object:
    the tags it is being created with)."""

    object_type: ObjectType
    object_id: str
    tags: frozenset[str] = frozenset()
    gateway: str | None = None
    door: str | None = None

    def __post_init__(self) -> None:
        if self.object_type is ObjectType.ALL:
            raise PermissionsInvalid("a target is one object: its type cannot be 'all'")
        if not self.object_id:
            raise PermissionsInvalid(f"a {self.object_type} target needs an object id")
        if self.door is not None and self.gateway is None:
            raise PermissionsInvalid(f"{self.object_type} {self.object_id!r}: a door needs its gateway")
        if self.object_type is ObjectType.GATEWAY and self.gateway != self.object_id:
            raise PermissionsInvalid(f"gateway target {self.object_id!r} must have gateway={self.object_id!r}")
        if self.object_type is ObjectType.DOOR and (
            self.door is None or self.object_id != f"{self.gateway}/{self.door}"
        ):
            raise PermissionsInvalid(f"door target {self.object_id!r}: use Target.for_door(gateway, door)")

    @classmethod
    def for_gateway(cls, gateway: str, tags: Iterable[str] = ()) -> Target:
        return cls(ObjectType.GATEWAY, gateway, frozenset(tags), gateway=gateway)

    @classmethod
    def for_door(cls, gateway: str, door: str, tags: Iterable[str] = ()) -> Target:
        return cls(ObjectType.DOOR, f"{gateway}/{door}", frozenset(tags), gateway=gateway, door=door)

    def refs(self) -> frozenset[str]:
        """The `applies_to` entries that select this target."""
        refs = {f"{self.object_type}:{self.object_id}"}
        if self.gateway is not None:
            refs.add(self.gateway)
            if self.door is not None:
                refs.add(f"{self.gateway}/{self.door}")
        return frozenset(refs)

    def describe(self) -> str:
        text = f"{self.object_type} {self.object_id}"
        if self.gateway is not None and self.object_type not in (ObjectType.GATEWAY, ObjectType.DOOR):
            text += f" (on {self.gateway}/{self.door})" if self.door else f" (on {self.gateway})"
        return text


class Verdict(msgspec.Struct, frozen=True):
    """`matched` names the lines that decided: the denies when denied by a deny, the grants when allowed."""

    allowed: bool
    reason: str
    matched: list[str] = []


class Requirement(msgspec.Struct, frozen=True):
    """One permission a composite operation needs: `action` on `target` (publish of `event_type`)."""

    action: Action
    target: Target
    event_type: str | None = None

    def describe(self) -> str:
        kind = f" ({self.event_type})" if self.event_type else ""
        return f"{self.action}{kind} on {self.target.describe()}"


def kind_of(action: msgspec.Struct) -> CommandKind:
    """The kind of a `cloud_bridge.protocol.CommandAction` (its wire tag): ``kind_of(Unlock(door="x"))``."""
    tag = type(action).__struct_config__.tag
    try:
        return CommandKind(str(tag))
    except ValueError:
        raise PermissionsInvalid(f"{type(action).__name__} is not a command this module knows") from None


def requirements_for(
    kind: CommandKind | str,
    gateway: str,
    door: str | None = None,
    *,
    door_tags: Iterable[str] = (),
    gateway_tags: Iterable[str] = (),
) -> list[Requirement]:
    """What a command needs, after seed 003 (the door stands for its readers, the gateway for the controller):

    * unlock: read + publish(unlock) on the door, read + publish(unlock) on the gateway;
    * door_mode: read + update + publish(door_mode) on the door, read + publish(door_mode) on the gateway;
    * lockdown, resync, rebirth: read + publish(kind) on the gateway (a gateway-wide command: every door).
    """
    try:
        k = CommandKind(kind)
    except ValueError:
        raise PermissionsInvalid(f"unknown command kind {kind!r}") from None
    gw = Target.for_gateway(gateway, gateway_tags)
    on_gateway = [Requirement(Action.READ, gw), Requirement(Action.PUBLISH, gw, k.value)]
    if k in (CommandKind.UNLOCK, CommandKind.DOOR_MODE):
        if door is None:
            raise PermissionsInvalid(f"a {k} command needs a door")
        d = Target.for_door(gateway, door, door_tags)
        on_door = [Requirement(Action.READ, d)]
        if k is CommandKind.DOOR_MODE:
            on_door.append(Requirement(Action.UPDATE, d))
        on_door.append(Requirement(Action.PUBLISH, d, k.value))
        return on_door + on_gateway
    return on_gateway


def _label(group: PermissionGroup, index: int, permission: Permission) -> str:
    return f"group {group.id!r} #{index}: {permission.describe()}"


class Authorizer:
    """Answers permission questions against a fixed set of groups (rebuild it when the groups change).

    The built-in `SYSTEM_ADMINISTRATOR` group is always present; passing it again (e.g. when loading every
    stored group) is fine, redefining its id is not."""

    def __init__(self, groups: Iterable[PermissionGroup] = ()) -> None:
        self._groups: dict[str, PermissionGroup] = {SYSTEM_ADMINISTRATOR.id: SYSTEM_ADMINISTRATOR}
        for g in groups:
            if g.id == SYSTEM_ADMINISTRATOR.id:
                if g != SYSTEM_ADMINISTRATOR:
                    raise PermissionsInvalid(f"group id {g.id!r} is reserved for the built-in System Administrator")
                continue
            if g.id in self._groups:
                raise PermissionsInvalid(f"two permission groups have the id {g.id!r}")
            self._groups[g.id] = g

    @property
    def groups(self) -> dict[str, PermissionGroup]:
        return dict(self._groups)

    def check(self, operator: Operator, action: Action, target: Target, *, event_type: str | None = None) -> Verdict:
        what = f"{action}{f' ({event_type})' if event_type else ''} on {target.describe()}"
        if not operator.active:
            return Verdict(False, f"operator {operator.id!r} is inactive")
        unknown = [g for g in operator.groups if g not in self._groups]
        if unknown:
            return Verdict(False, f"operator {operator.id!r} is in unknown permission group {unknown[0]!r}")
        grants: list[str] = []
        denies: list[str] = []
        for gid in dict.fromkeys(operator.groups):
            group = self._groups[gid]
            for i, p in enumerate(group.permissions):
                if p.matches(action, target, event_type):
                    (denies if p.effect is Effect.DENY else grants).append(_label(group, i, p))
        if denies:
            return Verdict(False, f"{what} is denied by {denies[0]}", denies)
        if grants:
            return Verdict(True, f"{what} is granted by {grants[0]}", grants)
        return Verdict(False, f"no permission grants {what}")

    def require(self, operator: Operator, action: Action, target: Target, *, event_type: str | None = None) -> Verdict:
        """Like `check`, but raises `PermissionDenied` unless allowed."""
        verdict = self.check(operator, action, target, event_type=event_type)
        if not verdict.allowed:
            raise PermissionDenied(operator.id, action, target, verdict)
        return verdict

    def check_all(self, operator: Operator, requirements: Sequence[Requirement]) -> Verdict:
        """All of `requirements`; a refusal names the first one missing. Allowed: `matched` has every grant."""
        matched: list[str] = []
        for r in requirements:
            v = self.check(operator, r.action, r.target, event_type=r.event_type)
            if not v.allowed:
                return Verdict(False, v.reason, v.matched)  # the reason names the missing permission
            matched.extend(v.matched)
        return Verdict(True, "every required permission is granted", list(dict.fromkeys(matched)))

    def check_command(
        self,
        operator: Operator,
        kind: CommandKind | str,
        gateway: str,
        door: str | None = None,
        *,
        door_tags: Iterable[str] = (),
        gateway_tags: Iterable[str] = (),
    ) -> Verdict:
        """May `operator` send command `kind` to `gateway` (about `door`)? See `requirements_for`."""
        reqs = requirements_for(kind, gateway, door, door_tags=door_tags, gateway_tags=gateway_tags)
        return self.check_all(operator, reqs)

    def require_command(
        self,
        operator: Operator,
        kind: CommandKind | str,
        gateway: str,
        door: str | None = None,
        *,
        door_tags: Iterable[str] = (),
        gateway_tags: Iterable[str] = (),
    ) -> Verdict:
        """Like `check_command`, but raises `PermissionDenied` (naming the missing permission) unless allowed."""
        reqs = requirements_for(kind, gateway, door, door_tags=door_tags, gateway_tags=gateway_tags)
        verdict = self.check_all(operator, reqs)
        if not verdict.allowed:
            target = reqs[0].target  # the door when there is one, else the gateway
            raise PermissionDenied(operator.id, Action.PUBLISH, target, verdict, kind=str(kind))
        return verdict


# --- the built-in group and the seed 002/003 examples -------------------------------------------------

SYSTEM_ADMINISTRATOR = PermissionGroup(
    id="system-administrator",
    name="System Administrator",
    description="Every action on every object type (built in).",
    permissions=[grant(ObjectType.ALL, *ALL_ACTIONS)],
)


def admin_except(id: str, name: str, *denies: Permission, description: str = "") -> PermissionGroup:
    """Seed 002: "a new Permission group like an Administrative level operator but without a specific item".
    Every `denies` line must be a deny."""
    for p in denies:
        if p.effect is not Effect.DENY:
            raise PermissionsInvalid(f"admin_except takes deny lines, got {p.describe()!r}")
    return PermissionGroup(
        id=id, name=name, description=description, permissions=[*SYSTEM_ADMINISTRATOR.permissions, *denies]
    )


def unlock_group(id: str, name: str, applies_to: Iterable[str] = (), description: str = "") -> PermissionGroup:
    """Seed 003 "Unlock Door": read + publish(unlock) on doors and gateways (limited to `applies_to` refs)."""
    limits: dict[str, Any] = {"applies_to": list(applies_to), "event_types": [CommandKind.UNLOCK.value]}
    return PermissionGroup(
        id=id,
        name=name,
        description=description,
        permissions=[
            grant(ObjectType.DOOR, Action.READ, Action.PUBLISH, **limits),
            grant(ObjectType.GATEWAY, Action.READ, Action.PUBLISH, **limits),
        ],
    )


def door_mode_group(id: str, name: str, applies_to: Iterable[str] = (), description: str = "") -> PermissionGroup:
    """Seed 003 "Update Reader Modes": read/update/publish(door_mode) on doors, read/publish on gateways,
    read on events and schedules."""
    limits: dict[str, Any] = {"applies_to": list(applies_to), "event_types": [CommandKind.DOOR_MODE.value]}
    return PermissionGroup(
        id=id,
        name=name,
        description=description,
        permissions=[
            grant(ObjectType.DOOR, Action.READ, Action.UPDATE, Action.PUBLISH, **limits),
            grant(ObjectType.GATEWAY, Action.READ, Action.PUBLISH, **limits),
            grant(ObjectType.SCHEDULE, Action.READ),
            grant(ObjectType.EVENT, Action.READ),
        ],
    )


def monitor_group(id: str, name: str, *, acknowledge: bool = False, description: str = "") -> PermissionGroup:
    """Seed 003 "View Live Monitoring / Event History" (event read) and, with `acknowledge`, "Acknowledge
    Events" (event read + update, user read)."""
    perms = [grant(ObjectType.EVENT, Action.READ, *([Action.UPDATE] if acknowledge else []))]
    if acknowledge:
        perms.append(grant(ObjectType.USER, Action.READ))
    return PermissionGroup(id=id, name=name, description=description, permissions=perms)


def tagged_editor_group(
    id: str,
    name: str,
    tags: Iterable[str],
    event_types: Iterable[str] = (),
    description: str = "",
) -> PermissionGroup:
    """Seed 003 "Allow modifying objects with a specific Tag": read everything; read, update, delete and
    publish (of `event_types`, empty = every kind) only objects carrying one of `tags`; never create."""
    tag_list = list(tags)
    if not tag_list:
        raise PermissionsInvalid("tagged_editor_group needs at least one tag")
    return PermissionGroup(
        id=id,
        name=name,
        description=description,
        permissions=[
            grant(ObjectType.ALL, Action.READ),
            grant(
                ObjectType.ALL,
                Action.READ,
                Action.UPDATE,
                Action.DELETE,
                Action.PUBLISH,
                tags=tag_list,
                event_types=list(event_types),
            ),
        ],
    )
