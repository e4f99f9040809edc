"""The error tree of the protocol layer.

Every error carries a machine-readable ``code``; for credentials those are the contract's
error codes (CONTRACT §4, §8.4), so a response can be built straight from the exception.

::

    ProtocolError                      (code)
    ├── FramingError                   bytes that do not make a frame
    ├── CborError                      bytes that are not strict, bounded CBOR
    ├── LocalProtocolError             we were asked to do something the state forbids
    ├── RemoteProtocolError            the peer sent something the state or crypto forbids
    │   └── AuthenticationError        a MAC, AEAD tag or pairing confirmation failed
    ├── FirmwareImageError             an MCUboot image was refused (protocols/firmware.py)
    └── CredentialError                a COSE/CWT document was refused (contract codes)
        ├── TokenError                 an unlock token or proof was refused
        └── TrustDocumentError         a keyring / revocation list / time statement was refused

Verification raises; it never returns a bool.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CborError",
    "CredentialError",
    "FirmwareImageError",
    "FramingError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "TokenError",
    "TrustDocumentError",
]


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocols`."""

    default_code = "protocol_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code!r})"


class FramingError(ProtocolError):
    default_code = "bad_frame"


class CborError(ProtocolError):
    default_code = "bad_cbor"


class LocalProtocolError(ProtocolError):
    default_code = "local_protocol_error"


class RemoteProtocolError(ProtocolError):
    default_code = "remote_protocol_error"


class AuthenticationError(RemoteProtocolError):
    default_code = "authentication_failed"


class FirmwareImageError(ProtocolError):
    default_code = "bad_image"


class CredentialError(ProtocolError):
    default_code = "token_invalid"


class TokenError(CredentialError):
    default_code = "token_invalid"


class TrustDocumentError(CredentialError):
    default_code = "document_invalid"
