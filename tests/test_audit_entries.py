"""The audit trail's entries, pure: what a transaction's reads and writes become."""

from __future__ import annotations

from extauthz.records import audit
from extauthz.records.audit import MASTER_KEY, Actor, Note

P = "extauthz:"
NOTE = Note(MASTER_KEY, "/key/update")


def test_an_update_lists_only_the_fields_that_changed() -> None:
    before = {"token": "h", "models": ["a"], "updated_at": "1", "metadata": {"x": 1}}
    after = {"token": "h", "models": ["a", "b"], "updated_at": "2", "metadata": {"x": 1}}
    found = audit.entry(NOTE, {P + "key:h": before}, {P + "key:h": after}, P, 0.0)
    assert found == {"time": "1970-01-01T00:00:00.000+00:00", "actor": {"type": "master_key"},
                     "route": "/key/update",
                     "records": [{"type": "key", "id": "h", "op": "update",
                                  "changes": {"models": {"before": ["a"], "after": ["a", "b"]}}}]}


def test_creates_deletes_and_no_ops() -> None:
    doc = {"team_id": "t", "team_alias": "Team T", "models": []}
    created = audit.entry(NOTE, {}, {P + "team:t": doc}, P, 0.0)
    assert created["records"][0]["op"] == "create" and created["records"][0]["alias"] == "Team T"
    deleted = audit.entry(NOTE, {P + "team:t": doc}, {P + "team:t": None}, P, 0.0)
    assert deleted["records"][0]["op"] == "delete"
    assert deleted["records"][0]["changes"]["models"] == {"before": [], "after": None}
    # An upsert that found the record there, or a write to no record: no entry at all.
    assert audit.entry(NOTE, {P + "team:t": doc}, {P + "team:t": dict(doc)}, P, 0.0) is None
    assert audit.entry(NOTE, {}, {P + "alias:x": {"a": 1}, "other:key:h": {"a": 1}}, P, 0.0) is None


def test_secrets_are_redacted_at_any_depth_but_key_ids_are_not() -> None:
    after = {"token": "hash", "key_name": "sk-...abcd", "key_alias": "k",
             "metadata": {"api_key": "sk-live", "nested": {"Client-Secret": "s", "list": [{"password": "p"}]},
                          "owner": "ml"},
             "provider_token": "t"}
    (record,) = audit.entry(NOTE, {}, {P + "key:hash": after}, P, 0.0)["records"]
    changes = record["changes"]
    assert changes["token"]["after"] == "hash" and changes["key_name"]["after"] == "sk-...abcd"
    assert changes["metadata"]["after"] == {"api_key": "[redacted]", "owner": "ml",
                                            "nested": {"Client-Secret": "[redacted]",
                                                       "list": [{"password": "[redacted]"}]}}
    assert changes["provider_token"]["after"] == "[redacted]"
    for secret in ("sk-live", '"s"', '"p"', '"t"'):
        assert secret not in audit.encode(record)


def test_filters() -> None:
    found = audit.entry(Note(Actor("jwt", user_id="alice", role="proxy_admin"), "/team/new"), {},
                        {P + "team:t": {"team_id": "t", "team_alias": "Team T"}}, P, 0.0)
    assert list(audit.targets(found)) == ["t", "Team T"]
    assert audit.selected(found, "t", "alice") and audit.selected(found, "Team T", None, "proxy_admin")
    assert not audit.selected(found, "u", None) and not audit.selected(found, None, "bob")
    assert not audit.selected(found, None, "proxy_admin") and not audit.selected(found, None, "jwt")
    master = audit.entry(NOTE, {}, {P + "team:t": {"team_id": "t"}}, P, 0.0)
    assert audit.selected(master, None, "master_key") and not audit.selected(master, None, "system")


def test_values_that_look_like_secrets_are_redacted_whatever_their_name() -> None:
    import hashlib
    import uuid
    for secret in ("sk-proj-4f9Qx0aLm2Zr8Tt1Vb6Nc", "sk-ant-api03-abcdefghijklmnop", "AKIAIOSFODNN7EXAMPLE",
                   "ghp_" + "a1B2" * 9, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2ln",
                   "-----BEGIN RSA PRIVATE KEY-----\nMIIE", "Bearer abcdefgh12345", "xoxb-1234-5678-abcdefgh",
                   "Zx9Qm2Lp8Rt4Vb7Nc1Ka5Hs3Jd6Fg0Wy", "see token Zx9Qm2Lp8Rt4Vb7Nc1Ka5Hs3Jd6Fg0Wy here"):
        assert audit.scrub({"note": secret}) == {"note": audit.REDACTED}, secret
        assert audit.scrub([secret]) == [audit.REDACTED]
    # Ids and ordinary words are not: hashes and UUIDs are one case; words are not random.
    for plain in (hashlib.sha256(b"x").hexdigest(), str(uuid.uuid4()), "cost-centre-4711-analytics-production",
                  "projects/my-project/locations/us-central1/endpoints/123456789", "gpt-4o-2024-08-06"):
        assert audit.scrub({"note": plain}) == {"note": plain}, plain
    for name in ("passphrase", "db_pwd", "bearer", "jwt", "session_id", "signature"):
        assert audit.scrub({name: "plain"}) == {name: audit.REDACTED}, name


def test_a_large_value_is_its_digest_and_size_and_ids_stay_whole() -> None:
    before = {"token": "h", "metadata": {}}
    after = {"token": "h", "metadata": {"notes": "n" * 5000}, "rotated_to": "a" * 64}
    found = audit.entry(NOTE, {P + "key:h": before}, {P + "key:h": after}, P, 0.0)
    changes = found["records"][0]["changes"]
    assert changes["metadata"]["before"] == {} and set(changes["metadata"]["after"]) == {"sha256", "bytes"}
    assert changes["metadata"]["after"]["bytes"] > 5000 and changes["rotated_to"]["after"] == "a" * 64
