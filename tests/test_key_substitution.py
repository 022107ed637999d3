"""Partners detect a hub that substitutes keys: they do not have to trust it.

The attack: a hub that serves a partner a key pair of its own in another partner's name can
derive the matching key and test guessed emails against the pseudonyms. Two dishonest hubs
are played here, both real: (1) a hub whose database an operator edits (the stored keys are
swapped, even re-signed with an identity the operator made), and (2) a front that relays to a
real hub and rewrites what it serves to one partner only (the "double serving" hub, which
shows each partner a different view). In every case the partner's SDK refuses before it
derives a matching key or sends a pseudonym, or the safety codes on the two partners' screens
differ, which is what the out-of-band comparison catches.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.partners import Client, PartnerKeys
from entremise.partners.identity import (
    key_fingerprint,
    public_key_statement,
    safety_code,
)
from entremise.partners.keys import generate_private_key, public_bytes
from entremise.partners.synthetic import BANK_SCHEMA, PURPOSE, generate
from entremise.sdk import MatchingKeyError
from entremise.v1 import partner_service_pb2
from tests.conftest import Hub
from tests.dishonest_hub import DishonestHub, Rewrite


@dataclass
class Pair:
    """A bank and a panel on one agreement; the bank trusts nothing it has not confirmed."""

    hub: Hub
    agreement_id: str
    bank_id: str
    bank_token: str
    bank_keys: PartnerKeys
    panel_id: str
    panel_token: str
    panel_keys: PartnerKeys

    def bank(self, target: str | None = None) -> Client:
        return Client.connect(target or self.hub.target, token=self.bank_token)

    def panel(self, target: str | None = None) -> Client:
        return Client.connect(target or self.hub.target, token=self.panel_token)

    def codes(self, target: str | None = None) -> tuple[str, str]:
        """The safety code on the bank's screen and on the panel's (via `target`)."""
        with self.bank(target) as bank, self.panel() as panel:
            return (
                bank.safety_code(self.agreement_id, self.bank_keys),
                panel.safety_code(self.agreement_id, self.panel_keys),
            )

    def confirm_both(self) -> str:
        code, panel_code = self.codes()
        assert code == panel_code
        with self.bank() as bank, self.panel() as panel:
            bank.confirm_keys(self.agreement_id, code, self.bank_keys)
            panel.confirm_keys(self.agreement_id, code, self.panel_keys)
        return code


def _pair(hub: Hub) -> Pair:
    bank, bank_token = hub.admin.create_principal("Banque", "partner")
    panel, panel_token = hub.admin.create_principal("Panel", "partner")
    analyst, _ = hub.admin.create_principal("Analyst", "analyst")
    bank_keys, panel_keys = PartnerKeys.generate(), PartnerKeys.generate()
    for token, keys in ((bank_token, bank_keys), (panel_token, panel_keys)):
        with Client.connect(hub.target, token=token) as client:
            client.publish_public_key(keys)
    agreement = hub.admin.create_agreement(
        name="keys",
        purpose=PURPOSE,
        datasets=[(bank.principal_id, "bank"), (panel.principal_id, "panel")],
        analyst_ids=[analyst.principal_id],
        total_epsilon="1",
    )
    return Pair(
        hub,
        agreement.agreement_id,
        bank.principal_id,
        bank_token,
        bank_keys,
        panel.principal_id,
        panel_token,
        panel_keys,
    )


@pytest.fixture
def pair(hub: Hub) -> Pair:
    return _pair(hub)


def _upload_as_bank(pair: Pair, target: str | None = None) -> None:
    with pair.bank(target) as bank:
        bank.upload_dataset(
            pair.agreement_id, "bank", generate(60, 30, 20).bank, BANK_SCHEMA, keys=pair.bank_keys
        )


def _hub_keys() -> tuple[bytes, Ed25519PrivateKey]:
    """A key pair and an identity that the dishonest hub made (it holds their private halves)."""
    return public_bytes(generate_private_key()), Ed25519PrivateKey.generate()


def _raw(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes_raw()


# -- (1) an operator edits the hub's database -------------------------------------------------


def _swap_stored_key(
    db_url: str, principal_id: str, public_key: bytes, identity: bytes, signature: bytes
) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE public_keys SET public_key = :k, identity_public_key = :i, "
                "signature = :s WHERE principal_id = :p"
            ),
            {"k": public_key, "i": identity, "s": signature, "p": principal_id},
        )
    engine.dispose()


def test_a_stored_key_swapped_under_the_old_signature_is_refused(pair: Pair, db_url: str) -> None:
    pair.confirm_both()
    with pair.panel() as panel:
        honest = panel.key_material(pair.agreement_id)
    mine = next(p for p in honest.participants if p.principal_id == pair.panel_id)
    hub_key, _ = _hub_keys()
    _swap_stored_key(
        db_url, pair.panel_id, hub_key, bytes(mine.identity_public_key), bytes(mine.signature)
    )
    with pytest.raises(MatchingKeyError, match="not signed by its identity key"):
        _upload_as_bank(pair)


def test_a_stored_key_re_signed_with_an_identity_the_hub_made_is_refused(
    pair: Pair, db_url: str
) -> None:
    code = pair.confirm_both()
    hub_key, hub_identity = _hub_keys()
    signature = hub_identity.sign(public_key_statement(pair.panel_id, hub_key))
    _swap_stored_key(db_url, pair.panel_id, hub_key, _raw(hub_identity), signature)
    # Confirmed before: the changed identity is refused, even with trust on first use.
    pair.bank_keys.trust_on_first_use = True
    with pytest.raises(MatchingKeyError, match="identity key changed since you confirmed"):
        _upload_as_bank(pair)
    # The panel is served another key and identity in its own name; the codes no longer agree.
    with pair.panel() as panel, pytest.raises(MatchingKeyError, match="substituting keys"):
        panel.safety_code(pair.agreement_id, pair.panel_keys)
    with pair.bank() as bank:
        assert bank.safety_code(pair.agreement_id, pair.bank_keys) != code


def test_keys_substituted_before_any_confirmation_give_different_safety_codes(
    hub: Hub, db_url: str
) -> None:
    pair = _pair(hub)
    honest = safety_code(
        pair.agreement_id,
        [
            (pair.bank_id, pair.bank_keys.identity_public_key),
            (pair.panel_id, pair.panel_keys.identity_public_key),
        ],
    )
    hub_key, hub_identity = _hub_keys()
    signature = hub_identity.sign(public_key_statement(pair.panel_id, hub_key))
    _swap_stored_key(db_url, pair.panel_id, hub_key, _raw(hub_identity), signature)
    with pair.bank() as bank:
        seen_by_bank = bank.safety_code(pair.agreement_id, pair.bank_keys)
        # Without a confirmed code the upload is refused, so nothing was pseudonymised yet.
        with pytest.raises(MatchingKeyError, match="not confirmed"):
            bank.matching_key(pair.agreement_id, pair.bank_keys)
        # The code the panel reads out (computed on the panel's machine) is refused.
        with pytest.raises(MatchingKeyError, match="does not match"):
            bank.confirm_keys(pair.agreement_id, honest, pair.bank_keys)
    assert seen_by_bank != honest


# -- (2) a hub that serves one partner a view of its own --------------------------------------


def _substitute_for(token: str, partner_id: str) -> Rewrite:
    """A rewrite that serves `token`'s caller a key and identity the hub made as `partner_id`'s."""
    hub_key, hub_identity = _hub_keys()

    def rewrite(method: str, caller: str, response: bytes) -> bytes:
        if method != "GetKeyMaterial" or caller != token:
            return response
        material = partner_service_pb2.GetKeyMaterialResponse.FromString(response)
        for p in material.participants:
            if p.principal_id == partner_id:
                p.public_key = hub_key
                p.identity_public_key = _raw(hub_identity)
                p.signature = hub_identity.sign(public_key_statement(partner_id, hub_key))
        # The fingerprint is recomputed over the substituted keys, so it checks out.
        material.key_fingerprint = key_fingerprint(
            material.agreement_id,
            [(p.principal_id, p.version, bytes(p.public_key)) for p in material.participants],
        )
        return material.SerializeToString()

    return rewrite


@pytest.fixture
def sqlite_pair(sqlite_hub: Hub) -> Pair:
    return _pair(sqlite_hub)


def test_a_hub_serving_one_partner_a_substituted_key_is_caught_by_the_safety_code(
    sqlite_pair: Pair,
) -> None:
    pair = sqlite_pair
    rewrite = _substitute_for(pair.bank_token, pair.panel_id)
    front = DishonestHub(pair.hub.target, rewrite)
    try:
        bank_code, panel_code = pair.codes(front.target)
        assert bank_code != panel_code  # what the partners see when they compare
        with pair.bank(front.target) as bank:
            with pytest.raises(MatchingKeyError, match="does not match"):
                bank.confirm_keys(pair.agreement_id, panel_code, pair.bank_keys)
        with pytest.raises(MatchingKeyError, match="not confirmed"):
            _upload_as_bank(pair, front.target)
    finally:
        front.close()


def test_a_substituted_key_is_refused_after_trust_on_first_use_pinned_the_real_one(
    sqlite_pair: Pair,
) -> None:
    pair = sqlite_pair
    pair.bank_keys.trust_on_first_use = True
    _upload_as_bank(pair)  # the honest hub first: the panel's identity is pinned
    assert pair.bank_keys.trust.pinned[pair.panel_id] == pair.panel_keys.identity_public_key.hex()
    front = DishonestHub(pair.hub.target, _substitute_for(pair.bank_token, pair.panel_id))
    try:
        with pytest.raises(MatchingKeyError, match="identity key changed since you first saw"):
            _upload_as_bank(pair, front.target)
    finally:
        front.close()


def test_a_fingerprint_that_does_not_match_the_served_keys_is_refused(sqlite_pair: Pair) -> None:
    pair = sqlite_pair
    pair.confirm_both()

    def rewrite(method: str, caller: str, response: bytes) -> bytes:
        if method != "GetKeyMaterial":
            return response
        material = partner_service_pb2.GetKeyMaterialResponse.FromString(response)
        material.key_fingerprint = "ab" * 32
        return material.SerializeToString()

    front = DishonestHub(pair.hub.target, rewrite)
    try:
        with pytest.raises(MatchingKeyError, match="fingerprint does not match"):
            _upload_as_bank(pair, front.target)
    finally:
        front.close()
    _upload_as_bank(pair)  # the honest hub: the same partner uploads


def test_the_hub_refuses_a_different_identity_for_a_partner(sqlite_pair: Pair) -> None:
    pair = sqlite_pair
    impostor = PartnerKeys(pair.bank_keys.private_key, Ed25519PrivateKey.generate())
    with pair.bank() as bank:
        with pytest.raises(Exception, match="identity_public_key: differs"):
            bank.publish_public_key(impostor)
        assert bank.publish_public_key(pair.bank_keys.rotated()).version == 2


# -- three partners: the leader signs the wrapped matching keys --------------------------------


def test_a_wrapped_matching_key_not_signed_by_the_leader_is_refused(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    tokens: dict[str, str] = {}
    keys: dict[str, PartnerKeys] = {}
    ids: dict[str, str] = {}
    for name in ("bank", "panel", "telco"):
        principal, tokens[name] = hub.admin.create_principal(name, "partner")
        ids[name] = principal.principal_id
        keys[name] = PartnerKeys.generate(trust_on_first_use=True)
        with Client.connect(hub.target, token=tokens[name]) as client:
            client.publish_public_key(keys[name])
    analyst, _ = hub.admin.create_principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="three",
        purpose=PURPOSE,
        datasets=[(ids[n], n) for n in ("bank", "panel", "telco")],
        analyst_ids=[analyst.principal_id],
        total_epsilon="1",
    )
    leader = min(ids, key=ids.__getitem__)
    others = [n for n in ids if n != leader]
    with Client.connect(hub.target, token=tokens[leader]) as client:
        matching = client.matching_key(agreement.agreement_id, keys[leader])  # distributes it
    victim, honest = others

    def rewrite(method: str, caller: str, response: bytes) -> bytes:
        if method != "GetKeyMaterial" or caller != tokens[victim]:
            return response
        material = partner_service_pb2.GetKeyMaterialResponse.FromString(response)
        material.wrapped_for_caller.signature = bytes(64)
        return material.SerializeToString()

    front = DishonestHub(hub.target, rewrite)
    try:
        with Client.connect(front.target, token=tokens[victim]) as client:
            with pytest.raises(MatchingKeyError, match="not signed by the key leader"):
                client.matching_key(agreement.agreement_id, keys[victim])
    finally:
        front.close()
    with Client.connect(hub.target, token=tokens[honest]) as client:
        assert client.matching_key(agreement.agreement_id, keys[honest]).key == matching.key
    with Client.connect(hub.target, token=tokens[victim]) as client:
        assert client.matching_key(agreement.agreement_id, keys[victim]).key == matching.key


def test_a_hub_serving_a_partner_another_identity_in_its_own_name_is_refused(
    sqlite_pair: Pair,
) -> None:
    pair = sqlite_pair
    _, hub_identity = _hub_keys()

    def rewrite(method: str, caller: str, response: bytes) -> bytes:
        if method != "GetKeyMaterial" or caller != pair.panel_token:
            return response
        material = partner_service_pb2.GetKeyMaterialResponse.FromString(response)
        for p in material.participants:
            if p.principal_id == pair.panel_id:  # the panel's own key, re-signed by the hub
                p.identity_public_key = _raw(hub_identity)
                p.signature = hub_identity.sign(
                    public_key_statement(pair.panel_id, bytes(p.public_key))
                )
        return material.SerializeToString()

    front = DishonestHub(pair.hub.target, rewrite)
    try:
        with pair.panel(front.target) as panel:
            with pytest.raises(MatchingKeyError, match="another identity key in your name"):
                panel.safety_code(pair.agreement_id, pair.panel_keys)
    finally:
        front.close()


def test_the_hub_refuses_unsigned_keys(sqlite_pair: Pair) -> None:
    """A courtesy check (the partners' own check is the guarantee): bad signatures fail early."""
    pair = sqlite_pair
    keys = pair.bank_keys.rotated()
    with pair.bank() as bank:
        for identity, signature, field in (
            (b"", b"", "identity_public_key: required"),
            (keys.identity_public_key, bytes(64), "signature: not the identity key's"),
        ):
            request = partner_service_pb2.PublishPublicKeyRequest(
                public_key=keys.public_key, identity_public_key=identity, signature=signature
            )
            with pytest.raises(Exception, match=field):
                bank._unary(bank._partner.PublishPublicKey, request)
