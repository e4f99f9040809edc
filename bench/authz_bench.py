"""Full authorization decisions per second against raw signature verifications per second.

A holder-bound decision contains two Ed25519 verifications (token and proof); the goal is
decisions/s ≥ 0.75 × (raw verifications/s ÷ 2), i.e. parsing and policy cost at most a third
of the crypto, with p99 decision latency under 1 ms. Both are measured in the same run.

Run: .venv/bin/python bench/authz_bench.py [--n 3000] [--alg EdDSA|ES256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from credfix import LOCK, T0, World

from protocols.cose import ALG_EDDSA, ALG_ES256, ContentType, generate_private_key, parse_sign1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    args = parser.parse_args()
    alg = ALG_EDDSA if args.alg == "EdDSA" else ALG_ES256
    w = World()
    w.issuer_a = generate_private_key(alg, b"iss-a", w.rng)
    w.holder = generate_private_key(alg, b"", w.rng)
    auth = w.authority()
    token = w.token()
    # Pre-make challenges and proofs: only the decision is timed.
    proofs = [w.prove(auth, token, mono=100.0) for _ in range(args.n)]

    # Baseline: the two raw verifications a decision contains, same library, same messages.
    tok_s1 = parse_sign1(token, ContentType.TOKEN, code="x")
    prf_s1 = parse_sign1(proofs[0], ContentType.PROOF, code="x", require_kid=False)
    tok_msg, prf_msg = tok_s1.to_be_signed(), prf_s1.to_be_signed()
    issuer_pub, holder_pub = w.issuer_a.public, w.holder.public
    t0 = time.perf_counter()
    for _ in range(args.n):
        issuer_pub.verify(tok_s1.signature, tok_msg)
        holder_pub.verify(prf_s1.signature, prf_msg)
    raw_s = time.perf_counter() - t0
    raw_verifications_per_s = 2 * args.n / raw_s

    latencies = []
    t0 = time.perf_counter()
    for proof in proofs:
        s = time.perf_counter()
        auth.decide(token, proof, lock=LOCK, action="unlock", wall=T0, synced=True, mono=101.0)
        latencies.append((time.perf_counter() - s) * 1e6)
    dec_s = time.perf_counter() - t0
    decisions_per_s = args.n / dec_s
    latencies.sort()
    report = {
        "alg": args.alg,
        "verifier": "libsodium (PyNaCl)" if alg == ALG_EDDSA else "OpenSSL (cryptography)",
        "n": args.n,
        "raw_verifications_per_s": round(raw_verifications_per_s),
        "decisions_per_s": round(decisions_per_s),
        "ratio_to_raw_pairs": round(decisions_per_s / (raw_verifications_per_s / 2), 3),
        "decision_us": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(latencies[int(0.99 * len(latencies)) - 1], 1),
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
