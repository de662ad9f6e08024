"""Credentials at rest (records/sealed.py): what Redis holds opens only with the same key,
for the same model and field, and shows nothing of the credential."""

import pytest

from extauthz.domain.providers import is_credential
from extauthz.records.sealed import SALT_KEY_ENV, SealError, Sealer, is_sealed

CREDENTIAL = "sk-provider-0123456789abcdefABCDEF"


def test_a_sealed_credential_opens_with_its_key_model_and_field():
    sealer = Sealer("salt-one")
    sealed = sealer.seal(CREDENTIAL, "model-1/api_key")
    assert is_sealed(sealed) and CREDENTIAL not in sealed and "0123456789" not in sealed
    assert Sealer("salt-one").open(sealed, "model-1/api_key") == CREDENTIAL


def test_sealing_twice_gives_two_texts():
    sealer = Sealer("salt-one")
    assert sealer.seal(CREDENTIAL, "m/api_key") != sealer.seal(CREDENTIAL, "m/api_key")


@pytest.mark.parametrize("context", ["model-2/api_key", "model-1/aws_secret_access_key"])
def test_a_sealed_value_moved_to_another_model_or_field_does_not_open(context):
    sealed = Sealer("salt-one").seal(CREDENTIAL, "model-1/api_key")
    with pytest.raises(SealError, match="does not open"):
        Sealer("salt-one").open(sealed, context)


def test_another_key_is_named_as_the_reason():
    sealed = Sealer("salt-one").seal(CREDENTIAL, "m/api_key")
    with pytest.raises(SealError, match=SALT_KEY_ENV):
        Sealer("salt-two").open(sealed, "m/api_key")


@pytest.mark.parametrize("damage", [lambda s: s[:-3] + ("A" if s[-3] != "A" else "B") + s[-2:],
                                    lambda s: s.rsplit(":", 1)[0] + ":", lambda s: s + ":x", lambda s: "sk-plain"])
def test_an_altered_or_unsealed_value_does_not_open(damage):
    sealed = Sealer("salt-one").seal(CREDENTIAL, "m/api_key")
    with pytest.raises(SealError):
        Sealer("salt-one").open(damage(sealed), "m/api_key")


def test_the_salt_key_wins_over_the_master_key():
    sealed = Sealer.from_environment("sk-master", {SALT_KEY_ENV: "salt"}).seal(CREDENTIAL, "m/k")
    assert Sealer("salt").open(sealed, "m/k") == CREDENTIAL
    assert Sealer.from_environment(None, {}) is None
    assert Sealer.from_environment("sk-master", {}).open(Sealer("sk-master").seal("x", "c"), "c") == "x"


@pytest.mark.parametrize("name,credential", [
    ("api_key", True), ("aws_secret_access_key", True), ("aws_access_key_id", True), ("aws_session_token", True),
    ("vertex_credentials", True), ("azure_ad_token", True), ("client_secret", True),
    ("model", False), ("api_base", False), ("api_version", False), ("max_tokens", False),
    ("input_cost_per_token", False), ("aws_region_name", False), ("organization", False)])
def test_which_params_are_credentials(name, credential):
    assert is_credential(name) is credential
