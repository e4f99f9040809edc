"""A small issuing world for credential tests: root, issuer keys, keyring, holder, authority."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from helpers import SeededRng

from gateway.authz.authorizer import Authorizer, TrustStore
from gateway.authz.clock import Clock
from protocols import issuer
from protocols.cose import ALG_EDDSA, ALG_ES256, PrivateCoseKey, generate_private_key
from protocols.credentials import Authority, Policy

T0 = 1_800_000_000  # "now" in tests: 2027-01-15
GW, SITE, LOCK = "gw-test-1", "site-a", "lk-door-1"


@dataclass
class World:
    rng: SeededRng = field(default_factory=lambda: SeededRng(b"world"))
    root: PrivateCoseKey = field(init=False)
    issuer_a: PrivateCoseKey = field(init=False)
    issuer_b: PrivateCoseKey = field(init=False)
    bearer_key: PrivateCoseKey = field(init=False)
    holder: PrivateCoseKey = field(init=False)
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        self.root = generate_private_key(ALG_EDDSA, b"root-1", self.rng)
        self.issuer_a = generate_private_key(ALG_EDDSA, b"iss-a", self.rng)
        self.issuer_b = generate_private_key(ALG_ES256, b"iss-b", self.rng)
        self.bearer_key = generate_private_key(ALG_EDDSA, b"bearer", self.rng)
        self.holder = generate_private_key(ALG_EDDSA, b"", self.rng)

    def keyring(
        self,
        version: int = 1,
        *,
        exp: int = T0 + 90 * 86400,
        site: str = SITE,
        a_exp: int = T0 + 60 * 86400,
        b_nbf: int = T0 - 86400,
    ) -> bytes:
        return issuer.keyring(
            self.root,
            site=site,
            version=version,
            iat=T0 - 86400,
            exp=exp,
            entries=[
                issuer.KeyringEntry(
                    self.issuer_a.public,
                    T0 - 30 * 86400,
                    a_exp,
                    ["staff", "emergency", "revocations", "time"],
                ),
                issuer.KeyringEntry(
                    self.issuer_b.public, b_nbf, T0 + 120 * 86400, ["staff"], max_ttl=8 * 3600
                ),
                issuer.KeyringEntry(
                    self.bearer_key.public, T0 - 86400, T0 + 120 * 86400, ["staff"], bearer=True
                ),
            ],
        )

    def authority(
        self, *, install: bool = True, floor: int = T0 - 365 * 86400, synced: bool = True
    ) -> Authority:
        auth = Authority(
            gw_id=GW,
            site=SITE,
            roots={self.root.public.kid: self.root.public},
            policy=self.policy,
            floor=floor,
        )
        if install:
            auth.install(self.keyring(), wall=T0, synced=synced)
        return auth

    def authorizer(
        self, data: Path, clock: Clock, *, gw_id: str = GW, release_floor: int = T0 - 10**7
    ) -> Authorizer:
        """The gateway's Authorizer for this world, its trust store in ``data`` (nothing installed)."""
        return Authorizer(
            gw_id=gw_id,
            site=SITE,
            roots={self.root.public.kid: self.root.public},
            policy=self.policy,
            store=TrustStore(data / "trust.sqlite3"),
            clock=clock,
            release_floor=release_floor,
        )

    def token(
        self,
        signer: PrivateCoseKey | None = None,
        *,
        holder: bool = True,
        iat: int = T0 - 60,
        ttl: int = 3600,
        **kw: object,
    ) -> bytes:
        args: dict = {
            "iss": "central",
            "sub": "staff-17",
            "aud": SITE,
            "iat": iat,
            "exp": iat + ttl,
            "locks": [LOCK],
            "act": ["unlock", "lock"],
            "rng": self.rng,
        }
        args.update(kw)
        return issuer.token(signer or self.issuer_a, holder=self.holder.public if holder else None, **args)

    def prove(
        self,
        auth: Authority,
        token: bytes,
        *,
        mono: float = 100.0,
        lock: str = LOCK,
        act: str = "unlock",
        gw: str = GW,
        nonce: bytes | None = None,
    ) -> bytes:
        n = nonce if nonce is not None else auth.challenge(lock=lock, action=act, mono=mono, rng=self.rng)
        return issuer.proof(self.holder, token_bytes=token, nonce=n, gw=gw, lock=lock, act=act)
