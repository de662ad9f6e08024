"""The CheckResponse bytes: parts encoded apart read back as one response."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from extauthz.domain.deny import Deny
from extauthz.check.responses import deny_bytes, metadata_part
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2


@pytest.mark.parametrize("metadata", [
    {"key_hash": "5a7ff8091ff3", "model": "gpt-4o"},
    {"key_alias": "ünïcode-ключ-🔑", "model": ""},
    {"deployment": "d" * 127, "model": "m" * 128, "team_id": "t" * 20_000},  # one- and multi-byte lengths
])
def test_metadata_reads_back_as_the_struct_it_encodes(metadata: dict[str, str]) -> None:
    response = external_auth_pb2.CheckResponse.FromString(metadata_part(metadata))
    assert json_format.MessageToDict(response.dynamic_metadata) == metadata
    expected = external_auth_pb2.CheckResponse()
    expected.dynamic_metadata.update(metadata)
    assert response == expected


def test_no_metadata_encodes_nothing() -> None:
    assert metadata_part(None) == metadata_part({}) == b""


def test_denies_alike_but_for_their_key_carry_each_its_own_metadata() -> None:
    first = Deny(403, "model_not_allowed", "Not allowed.", "model", {"key_hash": "aaaaaaaaaaaa"})
    second = Deny(403, "model_not_allowed", "Not allowed.", "model", {"key_hash": "bbbbbbbbbbbb"})
    for deny in (first, second, first):
        response = external_auth_pb2.CheckResponse.FromString(deny_bytes(deny))
        assert response.denied_response.status.code == 403
        assert '"code": "model_not_allowed"' in response.denied_response.body
        assert dict(response.dynamic_metadata) == deny.metadata
