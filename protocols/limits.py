"""Every bound the parsers enforce, in one place, each with its reason."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ATT_OVERHEAD",
    "CHALLENGE_NONCE_LEN",
    "CHALLENGE_TTL_S",
    "COMMAND_CACHE",
    "COMMAND_ID_LEN",
    "FRAME_HEADER_LEN",
    "LOG_BATCH_MAX",
    "MAX_ATT_MTU",
    "MAX_CBOR_DEPTH",
    "MAX_CBOR_ITEMS",
    "MAX_FRAME_BODY",
    "MAX_ID_LEN",
    "MAX_INT64",
    "MAX_KEYRING_BYTES",
    "MAX_LOCK_TEXT_LEN",
    "MAX_LOG_DATA_ITEMS",
    "MAX_LOG_DATA_KEY_LEN",
    "MAX_MESSAGES_PER_SESSION",
    "MAX_OUTSTANDING_CHALLENGES",
    "MAX_PROOF_BYTES",
    "MAX_REVOCATIONS_BYTES",
    "MAX_TIME_STATEMENT_BYTES",
    "MAX_TOKEN_BYTES",
    "MIN_ATT_MTU",
    "MIN_INT64",
    "NONCE_LEN",
    "SPAKE2_MESSAGE_LEN",
]

# --- lock wire protocol -------------------------------------------------------------------

#: Largest frame body. The biggest message is a log batch (LOG_BATCH_MAX entries of at most
#: ~48 bytes each) plus AEAD overhead; 1 KiB leaves headroom and keeps a hostile lock from
#: making the gateway buffer more than this per link.
MAX_FRAME_BODY: Final = 1024

#: Frame header: version (1) + type (1) + body length (2, big endian).
FRAME_HEADER_LEN: Final = 4

#: ATT MTU range we support: 23 is the Bluetooth minimum (and BlueZ's default), 517 the maximum.
MIN_ATT_MTU: Final = 23
MAX_ATT_MTU: Final = 517

#: ATT write/notify header (opcode + handle) taken from the MTU.
ATT_OVERHEAD: Final = 3

#: Log entries returned per READ_LOG: keeps one response frame under MAX_FRAME_BODY.
LOG_BATCH_MAX: Final = 16

#: AEAD messages per direction before a session must be re-established. Far above any real
#: session (a handful of commands) yet far below the 2**64 nonce space.
MAX_MESSAGES_PER_SESSION: Final = 2**32

#: Identifier lengths (gateway id and lock id share the contract's alphabet, ≤ 64 chars).
MAX_ID_LEN: Final = 64

#: Command ids are 16 random bytes from the gateway; idempotency key on the lock.
COMMAND_ID_LEN: Final = 16

#: How many recent command results a lock remembers for idempotent retries. A gateway retries
#: only the command in flight, so a small window is plenty; 64 survives bursts of status polls.
COMMAND_CACHE: Final = 64

#: Handshake nonces (bytes).
NONCE_LEN: Final = 16

#: A SPAKE2 message on Ed25519: one side byte ("A"/"B") and a 32-byte point. Anything else is
#: refused before the spake2 library sees it.
SPAKE2_MESSAGE_LEN: Final = 33

# --- values a paired lock sends (untrusted too: CONTRACT §8.13, THREATS B7) -----------------

#: Integers from a lock (lock_seq, log cursors, clock) must fit a signed 64-bit integer: the
#: outbox stores them in SQLite INTEGER columns, which overflow past 2**63 - 1.
MIN_INT64: Final = -(2**63)
MAX_INT64: Final = 2**63 - 1

#: Text a lock reports (firmware, name, log data values): a name on a display, not a document.
MAX_LOCK_TEXT_LEN: Final = 64

#: A log entry's ``data`` is a flat map of at most this many items (the simulator writes two at
#: most); keys are short words. Bounds what one entry can add to an event.
MAX_LOG_DATA_ITEMS: Final = 8
MAX_LOG_DATA_KEY_LEN: Final = 32

# --- CBOR / COSE (CONTRACT §3.1) ------------------------------------------------------------

#: Nesting depth of any decoded CBOR item (counted per decoded structure, CONTRACT §8.12).
MAX_CBOR_DEPTH: Final = 8

#: Items in any one array or map: bounds work per document (a revocation list of 1 MiB holds at
#: most ~50k 16-byte ctis; 65 536 leaves room without allowing pathological sizes).
MAX_CBOR_ITEMS: Final = 65_536

MAX_TOKEN_BYTES: Final = 2048
MAX_PROOF_BYTES: Final = 1024
MAX_KEYRING_BYTES: Final = 64 * 1024
MAX_REVOCATIONS_BYTES: Final = 1024 * 1024
MAX_TIME_STATEMENT_BYTES: Final = 512

#: Challenge nonces for proof of possession (CONTRACT §3.4).
CHALLENGE_NONCE_LEN: Final = 32
CHALLENGE_TTL_S: Final = 30.0

#: Outstanding challenges held at once: each is 32 bytes + binding; bounds memory under a
#: request flood while leaving ~100 per lock for a busy site.
MAX_OUTSTANDING_CHALLENGES: Final = 4096
