"""Operator permissions (seeds 002, 003): grants, deny wins, tags, applies_to, command kinds, commands."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_bridge.permissions import (
    ALL_ACTIONS,
    SYSTEM_ADMINISTRATOR,
    Action,
    Authorizer,
    CommandKind,
    Effect,
    ObjectType,
    Operator,
    Permission,
    PermissionDenied,
    PermissionGroup,
    PermissionsInvalid,
    Requirement,
    Target,
    admin_except,
    deny,
    door_mode_group,
    grant,
    kind_of,
    monitor_group,
    requirements_for,
    tagged_editor_group,
    unlock_group,
)
from cloud_bridge.protocol import Lockdown, SetDoorMode, Unlock
from edge.errors import EdgeError

A = Action
T = ObjectType
FRONT = Target.for_door("gw1", "front")
BACK = Target.for_door("gw1", "back")
GW1 = Target.for_gateway("gw1")
GW2 = Target.for_gateway("gw2")
ALICE = Target(T.USER, "alice")


def op(*groups: str, active: bool = True) -> Operator:
    return Operator(id="bob", name="Bob", groups=list(groups), active=active)


def authz(*perms: Permission) -> Authorizer:
    return Authorizer([PermissionGroup(id="g", name="G", permissions=list(perms))])


# --- basics -----------------------------------------------------------------------------------------------


def test_grant_allows_only_the_granted_type_and_action() -> None:
    a = authz(grant(T.DOOR, A.READ, A.UPDATE))
    v = a.check(op("g"), A.READ, FRONT)
    assert v.allowed
    assert v.matched == ["group 'g' #0: grant door read,update"]
    assert a.check(op("g"), A.UPDATE, FRONT).allowed
    refused = a.check(op("g"), A.DELETE, FRONT)
    assert not refused.allowed
    assert refused.reason == "no permission grants delete on door gw1/front"
    assert refused.matched == []
    assert not a.check(op("g"), A.READ, GW1).allowed  # other type
    assert not a.check(op(), A.READ, FRONT).allowed  # in no group


def test_all_type_matches_every_type() -> None:
    a = authz(grant(T.ALL, A.READ))
    for t in T:
        if t is T.ALL:
            continue
        target = GW1 if t is T.GATEWAY else FRONT if t is T.DOOR else Target(t, "x")
        assert a.check(op("g"), A.READ, target).allowed, t
        assert not a.check(op("g"), A.CREATE, target).allowed, t


def test_system_administrator_is_built_in_and_allows_everything() -> None:
    a = Authorizer()
    admin = Operator(id="root", groups=[SYSTEM_ADMINISTRATOR.id])
    for action in ALL_ACTIONS:
        for target in (FRONT, GW1, ALICE, Target(T.SITE_KEY, "site"), Target(T.OPERATOR, "eve")):
            assert a.check(admin, action, target, event_type="lockdown").allowed
    assert a.check_command(admin, "lockdown", "gw1").allowed
    # loading every stored group, the built-in one included, is fine; redefining it is not
    Authorizer([SYSTEM_ADMINISTRATOR])
    with pytest.raises(PermissionsInvalid, match="reserved"):
        Authorizer([PermissionGroup(id=SYSTEM_ADMINISTRATOR.id, permissions=[])])


def test_inactive_operator_is_denied_everything() -> None:
    v = Authorizer().check(op(SYSTEM_ADMINISTRATOR.id, active=False), A.READ, GW1)
    assert not v.allowed
    assert v.reason == "operator 'bob' is inactive"
    with pytest.raises(PermissionDenied, match="inactive"):
        Authorizer().require_command(op(SYSTEM_ADMINISTRATOR.id, active=False), "unlock", "gw1", "front")


def test_unknown_group_fails_closed() -> None:
    # a group that was deleted might have held the deny the operator was meant to have
    v = Authorizer().check(op(SYSTEM_ADMINISTRATOR.id, "gone"), A.READ, GW1)
    assert not v.allowed
    assert "unknown permission group 'gone'" in v.reason


def test_duplicate_group_ids_are_refused() -> None:
    g = PermissionGroup(id="g", permissions=[])
    with pytest.raises(PermissionsInvalid, match="'g'"):
        Authorizer([g, g])


# --- deny wins (seed 002) ---------------------------------------------------------------------------------


def test_admin_except_one_item_deny_wins() -> None:
    # seed 002: "a new Permission group like an Administrative level operator but without a specific item"
    ops = admin_except("ops", "Admin but no site key", deny(T.SITE_KEY, *ALL_ACTIONS))
    a = Authorizer([ops])
    bob = op("ops")
    assert a.check(bob, A.DELETE, ALICE).allowed
    assert a.check(bob, A.CREATE, GW1).allowed
    v = a.check(bob, A.UPDATE, Target(T.SITE_KEY, "site"))
    assert not v.allowed
    assert v.reason == (
        "update on site_key site is denied by group 'ops' #1: deny site_key create,read,update,delete,publish"
    )
    assert v.matched == ["group 'ops' #1: deny site_key create,read,update,delete,publish"]
    # deny wins across groups too: being also a System Administrator does not lift it
    assert not a.check(op(SYSTEM_ADMINISTRATOR.id, "ops"), A.UPDATE, Target(T.SITE_KEY, "site")).allowed
    with pytest.raises(PermissionsInvalid):
        admin_except("x", "x", grant(T.DOOR, A.READ))


def test_require_raises_with_operator_action_and_object() -> None:
    a = Authorizer([admin_except("ops", "Ops", deny(T.USER, A.DELETE))])
    assert a.require(op("ops"), A.READ, ALICE).allowed
    with pytest.raises(PermissionDenied) as e:
        a.require(op("ops"), A.DELETE, ALICE)
    assert isinstance(e.value, EdgeError)
    assert str(e.value) == (
        "operator 'bob' may not delete user alice: delete on user alice is denied by group 'ops' #1: deny user delete"
    )
    assert e.value.operator == "bob"
    assert e.value.action is A.DELETE
    assert e.value.target == ALICE
    assert not e.value.verdict.allowed


# --- tags (seed 003 "Allow modifying objects with a specific Tag") ---------------------------------------


def test_tagged_editor_reads_all_but_modifies_only_tagged() -> None:
    a = Authorizer([tagged_editor_group("lobby", "Lobby editors", ["lobby"])])
    bob = op("lobby")
    tagged = Target.for_door("gw1", "front", tags={"lobby", "ground"})
    untagged = Target.for_door("gw1", "back", tags={"garage"})
    for t in (tagged, untagged, ALICE):
        assert a.check(bob, A.READ, t).allowed
    for action in (A.UPDATE, A.DELETE, A.PUBLISH):
        assert a.check(bob, action, tagged, event_type="unlock").allowed
        v = a.check(bob, action, untagged, event_type="unlock")
        assert not v.allowed
        assert v.reason.startswith("no permission grants")
    # "This permission group does not allow the group to ADD new objects"
    assert not a.check(bob, A.CREATE, Target(T.USER, "new", tags=frozenset({"lobby"}))).allowed
    assert a.check_command(bob, "unlock", "gw1", "front", door_tags={"lobby"}, gateway_tags={"lobby"}).allowed
    # the gateway must carry the tag too: an unlock publishes on the controller
    v = a.check_command(bob, "unlock", "gw1", "front", door_tags={"lobby"})
    assert not v.allowed
    assert "gateway gw1" in v.reason
    with pytest.raises(PermissionsInvalid):
        tagged_editor_group("x", "x", [])


def test_tag_limited_deny_only_hits_tagged_objects() -> None:
    a = Authorizer([admin_except("ops", "Ops", deny(T.ALL, A.DELETE, tags=["vip"]))])
    assert a.check(op("ops"), A.DELETE, Target(T.USER, "carol", tags=frozenset({"staff"}))).allowed
    assert not a.check(op("ops"), A.DELETE, Target(T.USER, "ceo", tags=frozenset({"vip", "staff"}))).allowed


# --- applies_to -------------------------------------------------------------------------------------------


def test_applies_to_a_gateway_covers_its_doors_and_objects() -> None:
    a = authz(grant(T.ALL, A.READ, A.UPDATE, applies_to=["gw1"]))
    bob = op("g")
    assert a.check(bob, A.UPDATE, GW1).allowed
    assert a.check(bob, A.UPDATE, FRONT).allowed
    assert a.check(bob, A.UPDATE, BACK).allowed
    assert a.check(bob, A.READ, Target(T.READER, "gw1/r1", gateway="gw1", door="front")).allowed
    assert a.check(bob, A.UPDATE, Target(T.USER, "alice", gateway="gw1")).allowed
    assert not a.check(bob, A.UPDATE, GW2).allowed
    assert not a.check(bob, A.UPDATE, Target.for_door("gw2", "front")).allowed
    assert not a.check(bob, A.UPDATE, ALICE).allowed  # site-wide user: not on gw1


def test_applies_to_a_door_covers_that_door_only() -> None:
    a = authz(grant(T.ALL, A.READ, A.PUBLISH, applies_to=["gw1/front"]))
    bob = op("g")
    assert a.check(bob, A.PUBLISH, FRONT, event_type="unlock").allowed
    assert a.check(bob, A.READ, Target(T.READER, "gw1/r1", gateway="gw1", door="front")).allowed
    assert not a.check(bob, A.PUBLISH, BACK, event_type="unlock").allowed
    assert not a.check(bob, A.PUBLISH, GW1, event_type="unlock").allowed  # not the whole gateway
    assert not a.check(bob, A.PUBLISH, Target.for_door("gw2", "front"), event_type="unlock").allowed
    # hence no remote unlock: the gateway publish is missing
    v = a.check_command(bob, "unlock", "gw1", "front")
    assert not v.allowed
    assert v.reason == "no permission grants read on gateway gw1"


def test_applies_to_a_typed_ref_names_one_object() -> None:
    a = authz(grant(T.USER, A.UPDATE, applies_to=["user:alice"]), grant(T.GATEWAY, A.READ, applies_to=["gateway:gw1"]))
    assert a.check(op("g"), A.UPDATE, ALICE).allowed
    assert a.check(op("g"), A.UPDATE, Target(T.USER, "alice", gateway="gw9")).allowed
    assert not a.check(op("g"), A.UPDATE, Target(T.USER, "alicia")).allowed
    assert a.check(op("g"), A.READ, GW1).allowed
    assert not a.check(op("g"), A.READ, GW2).allowed


def test_deny_on_one_door_of_an_admin() -> None:
    a = Authorizer([admin_except("ops", "Ops", deny(T.DOOR, A.PUBLISH, applies_to=["gw1/vault"]))])
    assert a.check_command(op("ops"), "unlock", "gw1", "front").allowed
    v = a.check_command(op("ops"), "unlock", "gw1", "vault")
    assert not v.allowed
    assert v.reason == (
        "publish (unlock) on door gw1/vault is denied by group 'ops' #1: deny door publish applies_to=gw1/vault"
    )


@pytest.mark.parametrize("ref", ["", "a/b/c", "/door", "gw1/", "user:", "has space"])
def test_bad_applies_to_entries_are_refused(ref: str) -> None:
    with pytest.raises((PermissionsInvalid, msgspec.ValidationError)):
        msgspec.convert({"object_type": "door", "actions": ["read"], "applies_to": [ref]}, Permission)
    if ref and " " not in ref:  # the pattern lets these through to __post_init__
        with pytest.raises(PermissionsInvalid):
            grant(T.DOOR, A.READ, applies_to=[ref])


# --- event types ------------------------------------------------------------------------------------------


def test_event_types_limit_publish() -> None:
    a = Authorizer([unlock_group("unlockers", "Unlock only")])
    bob = op("unlockers")
    v = a.check_command(bob, "unlock", "gw1", "front")
    assert v.allowed
    assert v.matched == [
        "group 'unlockers' #0: grant door read,publish kinds=unlock",
        "group 'unlockers' #1: grant gateway read,publish kinds=unlock",
    ]
    v = a.check_command(bob, CommandKind.LOCKDOWN, "gw1")
    assert not v.allowed
    assert v.reason == "no permission grants publish (lockdown) on gateway gw1"
    assert not a.check_command(bob, "door_mode", "gw1", "front").allowed  # needs door update
    # event_types only limit publish: read is granted whatever the kind
    assert a.check(bob, A.READ, FRONT).allowed
    # a publish that names no kind means any kind: a kind-limited grant does not cover it...
    assert not a.check(bob, A.PUBLISH, FRONT).allowed


def test_kind_limited_deny_covers_a_publish_of_any_kind() -> None:
    a = Authorizer([admin_except("ops", "Ops", deny(T.GATEWAY, A.PUBLISH, event_types=["lockdown"]))])
    assert a.check_command(op("ops"), "unlock", "gw1", "front").allowed
    assert a.check_command(op("ops"), "resync", "gw1").allowed
    assert not a.check_command(op("ops"), "lockdown", "gw1").allowed
    assert not a.check(op("ops"), A.PUBLISH, GW1).allowed  # ...and a kind-limited deny does


def test_event_types_need_publish() -> None:
    with pytest.raises(PermissionsInvalid, match="publish"):
        grant(T.DOOR, A.READ, event_types=["unlock"])


# --- commands (seed 003 "Unlock Door", "Update Reader Modes") -------------------------------------------


def test_requirements_for_each_command() -> None:
    def listed(reqs: list[Requirement]) -> list[tuple[str, str, str, str | None]]:
        return [(r.target.object_type, r.target.object_id, r.action, r.event_type) for r in reqs]

    assert listed(requirements_for("unlock", "gw1", "front")) == [
        ("door", "gw1/front", "read", None),
        ("door", "gw1/front", "publish", "unlock"),
        ("gateway", "gw1", "read", None),
        ("gateway", "gw1", "publish", "unlock"),
    ]
    assert listed(requirements_for(CommandKind.DOOR_MODE, "gw1", "front")) == [
        ("door", "gw1/front", "read", None),
        ("door", "gw1/front", "update", None),
        ("door", "gw1/front", "publish", "door_mode"),
        ("gateway", "gw1", "read", None),
        ("gateway", "gw1", "publish", "door_mode"),
    ]
    for kind in ("lockdown", "resync", "rebirth"):
        assert listed(requirements_for(kind, "gw1")) == [
            ("gateway", "gw1", "read", None),
            ("gateway", "gw1", "publish", kind),
        ]
    with pytest.raises(PermissionsInvalid, match="needs a door"):
        requirements_for("unlock", "gw1")
    with pytest.raises(PermissionsInvalid, match="unknown command kind 'explode'"):
        requirements_for("explode", "gw1")


@pytest.mark.parametrize(
    ("publish_on", "named"),
    [
        (T.GATEWAY, "no permission grants publish (unlock) on door gw1/front"),  # door publish missing
        (T.DOOR, "no permission grants publish (unlock) on gateway gw1"),  # gateway publish missing
    ],
)
def test_unlock_needs_publish_on_door_and_gateway(publish_on: ObjectType, named: str) -> None:
    reads = [grant(T.DOOR, A.READ), grant(T.GATEWAY, A.READ)]
    both = authz(*reads, grant(T.DOOR, A.PUBLISH), grant(T.GATEWAY, A.PUBLISH))
    assert both.check_command(op("g"), "unlock", "gw1", "front").allowed
    a = authz(*reads, grant(publish_on, A.PUBLISH))
    v = a.check_command(op("g"), "unlock", "gw1", "front")
    assert not v.allowed
    assert v.reason == named
    with pytest.raises(PermissionDenied) as e:
        a.require_command(op("g"), "unlock", "gw1", "front")
    assert str(e.value) == f"operator 'bob' may not unlock door gw1/front: {named}"
    assert e.value.kind == "unlock"
    # read is part of it too (seed 003: "Controller - Read and Publish")
    no_read = authz(grant(T.DOOR, A.READ, A.PUBLISH), grant(T.GATEWAY, A.PUBLISH))
    assert no_read.check_command(op("g"), "unlock", "gw1", "front").reason == "no permission grants read on gateway gw1"


def test_door_mode_group_and_monitor_groups() -> None:
    a = Authorizer(
        [
            door_mode_group("modes", "Door modes", applies_to=["gw1"]),
            monitor_group("watch", "Watch"),
            monitor_group("ack", "Acknowledge", acknowledge=True),
        ]
    )
    assert a.check_command(op("modes"), "door_mode", "gw1", "front").allowed
    assert not a.check_command(op("modes"), "door_mode", "gw2", "front").allowed
    assert not a.check_command(op("modes"), "unlock", "gw1", "front").allowed
    ev = Target(T.EVENT, "e1", gateway="gw1")
    assert a.check(op("watch"), A.READ, ev).allowed
    assert not a.check(op("watch"), A.UPDATE, ev).allowed
    assert a.check(op("ack"), A.UPDATE, ev).allowed
    assert a.check(op("ack"), A.READ, ALICE).allowed


def test_kind_of_protocol_actions() -> None:
    assert kind_of(Unlock(door="front")) is CommandKind.UNLOCK
    assert kind_of(SetDoorMode(door="front")) is CommandKind.DOOR_MODE
    assert kind_of(Lockdown(active=True)) is CommandKind.LOCKDOWN


# --- structs: storage round trip and validation ---------------------------------------------------------


def test_groups_and_operators_round_trip_json_and_msgpack() -> None:
    g = admin_except("ops", "Ops", deny(T.DOOR, A.PUBLISH, A.PUBLISH, tags=["vault"], applies_to=["gw1", "gw2/x"]))
    o = Operator(id="bob@example.com", name="Bob", groups=["ops"])
    for enc, dec in ((msgspec.json.encode, msgspec.json.decode), (msgspec.msgpack.encode, msgspec.msgpack.decode)):
        assert dec(enc(g), type=PermissionGroup) == g
        assert dec(enc(o), type=Operator) == o
    assert g.permissions[1].actions == [A.PUBLISH]  # duplicates dropped
    assert grant(T.DOOR, A.PUBLISH, A.READ) == grant(T.DOOR, A.READ, A.PUBLISH)  # order kept canonical
    assert msgspec.json.decode(b'{"object_type":"door","actions":["read"]}', type=Permission).effect is Effect.GRANT


@pytest.mark.parametrize(
    "doc",
    [
        b'{"object_type":"doors","actions":["read"]}',
        b'{"object_type":"door","actions":[]}',
        b'{"object_type":"door","actions":["execute"]}',
        b'{"object_type":"door","actions":["read"],"effect":"maybe"}',
        b'{"object_type":"door","actions":["read"],"aplies_to":["gw1"]}',
        b'{"object_type":"door","actions":["read"],"event_types":["unlock"]}',
    ],
)
def test_malformed_permissions_are_refused_on_decode(doc: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(doc, type=Permission)


def test_target_validation() -> None:
    with pytest.raises(PermissionsInvalid):
        Target(T.ALL, "x")
    with pytest.raises(PermissionsInvalid):
        Target(T.DOOR, "front", gateway="gw1", door="front")  # object id must be the door ref
    with pytest.raises(PermissionsInvalid):
        Target(T.GATEWAY, "gw1")
    with pytest.raises(PermissionsInvalid):
        Target(T.READER, "r1", door="front")  # a door without its gateway
    assert FRONT.refs() == {"door:gw1/front", "gw1", "gw1/front"}
    assert GW1.refs() == {"gateway:gw1", "gw1"}


# --- properties -------------------------------------------------------------------------------------------

TAGS = ["a", "b"]
GWS = ["gw1", "gw2"]
DOORS = ["d1", "d2"]
KINDS = ["unlock", "lockdown"]
TYPES = [T.GATEWAY, T.DOOR, T.USER, T.ALL]

permissions = st.builds(
    lambda ot, actions, effect, tags, applies, kinds: Permission(
        object_type=ot,
        actions=actions,
        effect=effect,
        tags=tags,
        applies_to=applies,
        event_types=kinds if A.PUBLISH in actions else [],
    ),
    st.sampled_from(TYPES),
    st.lists(st.sampled_from(ALL_ACTIONS), min_size=1, max_size=3),
    st.sampled_from(Effect),
    st.lists(st.sampled_from(TAGS), max_size=2),
    st.lists(st.sampled_from([*GWS, "gw1/d1", "gw2/d2", "user:u1", "gateway:gw2"]), max_size=2),
    st.lists(st.sampled_from(KINDS), max_size=1),
)


@st.composite
def targets(draw: st.DrawFn) -> Target:
    tags = frozenset(draw(st.lists(st.sampled_from(TAGS), max_size=2)))
    kind = draw(st.sampled_from([T.GATEWAY, T.DOOR, T.USER]))
    gw = draw(st.sampled_from(GWS))
    if kind is T.GATEWAY:
        return Target.for_gateway(gw, tags)
    if kind is T.DOOR:
        return Target.for_door(gw, draw(st.sampled_from(DOORS)), tags)
    return Target(T.USER, draw(st.sampled_from(["u1", "u2"])), tags, gateway=draw(st.sampled_from([None, gw])))


queries = st.tuples(st.sampled_from(ALL_ACTIONS), targets(), st.sampled_from([None, *KINDS]))


def _check(perms: list[Permission], q: tuple[Action, Target, str | None]) -> bool:
    action, target, kind = q
    return authz(*perms).check(op("g"), action, target, event_type=kind).allowed


@settings(max_examples=300, deadline=None)
@given(st.lists(permissions, max_size=6), permissions, queries)
def test_adding_a_deny_never_allows_and_adding_a_grant_never_denies(
    perms: list[Permission], extra: Permission, q: tuple[Action, Target, str | None]
) -> None:
    before = _check(perms, q)
    after = _check([*perms, extra], q)
    if extra.effect is Effect.DENY:
        assert after <= before  # denied stays denied
    else:
        assert after >= before  # allowed stays allowed


@settings(max_examples=300, deadline=None)
@given(st.lists(permissions, max_size=6), queries)
def test_any_matching_deny_refuses_and_allowed_means_a_matching_grant(
    perms: list[Permission], q: tuple[Action, Target, str | None]
) -> None:
    action, target, kind = q
    v = authz(*perms).check(op("g"), action, target, event_type=kind)
    matching = [p for p in perms if p.matches(action, target, kind)]
    has_deny = any(p.effect is Effect.DENY for p in matching)
    has_grant = any(p.effect is Effect.GRANT for p in matching)
    assert v.allowed == (has_grant and not has_deny)
    # the admin group plus the same lines: a matching deny still wins over "all types, every action"
    with_admin = Authorizer([PermissionGroup(id="g", permissions=perms)]).check(
        op(SYSTEM_ADMINISTRATOR.id, "g"), action, target, event_type=kind
    )
    assert with_admin.allowed == (not has_deny)
    if has_deny:
        assert all("deny" in m for m in with_admin.matched)
