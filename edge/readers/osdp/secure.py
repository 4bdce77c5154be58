"""OSDP Secure Channel (SIA OSDP v2.2 annex D): key derivation, cryptograms, MAC chaining, data encryption.

Pure and synchronous; AES-128 from `cryptography`. The handshake, from the control panel's side::

    CP -> PD  osdp_CHLNG  (SCS_11)  RND.A (8 bytes)
    PD -> CP  osdp_CCRYPT (SCS_12)  cUID (8) | RND.B (8) | client cryptogram = AES(S-ENC, RND.A | RND.B)
    CP -> PD  osdp_SCRYPT (SCS_13)  server cryptogram = AES(S-ENC, RND.B | RND.A)
    PD -> CP  osdp_RMAC_I (SCS_14)  R-MAC_I = AES(S-MAC2, AES(S-MAC1, server cryptogram))

Session keys: AES(SCBK, 01 82|01 01|01 02, RND.A[0:6], 0 x 8) for S-ENC, S-MAC1, S-MAC2.
MAC of a message: CBC over all blocks but the last with S-MAC1, the last with S-MAC2, IV = the previous MAC
of the other direction (a command chains on the last reply MAC, starting from R-MAC_I; a reply on its
command's MAC). Only the first 4 bytes travel. Data blocks are AES-CBC with S-ENC, IV = the complement of
that same chained MAC, padded with 0x80 then zeros.

Key material never appears in a repr or a log line.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: SCBK-D, the default "install mode" key of the spec.
SCBK_DEFAULT: Final = bytes(range(0x30, 0x40))

SCS_11: Final = 0x11
SCS_12: Final = 0x12
SCS_13: Final = 0x13
SCS_14: Final = 0x14
SCS_15: Final = 0x15  # CP -> PD, MAC, data in clear
SCS_16: Final = 0x16  # PD -> CP, MAC, data in clear
SCS_17: Final = 0x17  # CP -> PD, MAC, data encrypted
SCS_18: Final = 0x18  # PD -> CP, MAC, data encrypted

KEY_SCBK: Final = 0x01
KEY_SCBK_D: Final = 0x00


class _Aes:
    """One AES-128 key kept as reusable ECB encryptor/decryptor contexts (cheap per block)."""

    __slots__ = ("_dec", "_enc", "decrypt", "encrypt")

    def __init__(self, key: bytes) -> None:
        if len(key) != 16:
            raise ValueError("AES-128 key must be 16 bytes")
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        #: ECB over whole blocks: the contexts' own `update` (no Python frame in between)
        self.encrypt: Callable[[bytes], bytes] = self._enc.update
        self.decrypt: Callable[[bytes], bytes] = self._dec.update

    def __repr__(self) -> str:
        return "_Aes(<key>)"


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(16, "big")


def _not(a: bytes) -> bytes:
    return bytes(0xFF - x for x in a)


def aes_ecb(key: bytes, block: bytes) -> bytes:
    return _Aes(key).encrypt(block)


def session_keys(scbk: bytes, rnd_a: bytes) -> tuple[bytes, bytes, bytes]:
    """(S-ENC, S-MAC1, S-MAC2) derived from the base key and the CP's challenge."""
    aes = _Aes(scbk)
    tail = rnd_a[:6] + bytes(8)
    return (
        aes.encrypt(b"\x01\x82" + tail),
        aes.encrypt(b"\x01\x01" + tail),
        aes.encrypt(b"\x01\x02" + tail),
    )


def client_cryptogram(s_enc: bytes, rnd_a: bytes, rnd_b: bytes) -> bytes:
    return aes_ecb(s_enc, rnd_a + rnd_b)


def server_cryptogram(s_enc: bytes, rnd_a: bytes, rnd_b: bytes) -> bytes:
    return aes_ecb(s_enc, rnd_b + rnd_a)


def initial_rmac(s_mac1: bytes, s_mac2: bytes, server_crypt: bytes) -> bytes:
    return aes_ecb(s_mac2, aes_ecb(s_mac1, server_crypt))


def pad(data: bytes) -> bytes:
    """0x80 then zeros up to a multiple of 16 (always at least the marker)."""
    n = len(data) + 1
    return data + b"\x80" + bytes((-n) % 16)


def unpad(data: bytes) -> bytes | None:
    end = len(data)
    while end and data[end - 1] == 0:
        end -= 1
    if end == 0 or data[end - 1] != 0x80:
        return None
    return data[: end - 1]


class HandshakeError(Exception):
    """Internal to the handshake; the panel turns it into a `ReaderFault(kind="handshake")`."""


class SecureChannel:
    """The CP side of one Secure Channel session with one PD."""

    __slots__ = ("_enc", "_mac1", "_mac2", "c_mac", "established", "key_type", "r_mac", "rnd_a", "rnd_b")

    def __init__(self, scbk: bytes, *, key_type: int = KEY_SCBK, rnd_a: bytes | None = None) -> None:
        self.key_type = key_type
        self.rnd_a = rnd_a if rnd_a is not None else os.urandom(8)
        self.rnd_b = b""
        s_enc, s_mac1, s_mac2 = session_keys(scbk, self.rnd_a)
        self._enc = _Aes(s_enc)
        self._mac1 = _Aes(s_mac1)
        self._mac2 = _Aes(s_mac2)
        self.c_mac = b""
        self.r_mac = b""
        self.established = False

    def __repr__(self) -> str:
        return f"SecureChannel(established={self.established}, key_type={self.key_type})"

    # --- handshake ---

    def challenge(self) -> bytes:
        """osdp_CHLNG data."""
        return self.rnd_a

    def check_ccrypt(self, rnd_b: bytes, cryptogram: bytes) -> bytes:
        """Verify the PD's client cryptogram; return the server cryptogram for osdp_SCRYPT."""
        expected = self._enc.encrypt(self.rnd_a + rnd_b)
        if not hmac.compare_digest(expected, cryptogram):
            raise HandshakeError("client cryptogram does not verify: the reader holds another key")
        self.rnd_b = rnd_b
        return self._enc.encrypt(rnd_b + self.rnd_a)

    def check_rmac_i(self, rmac: bytes) -> None:
        server = self._enc.encrypt(self.rnd_b + self.rnd_a)
        expected = self._mac2.encrypt(self._mac1.encrypt(server))
        if not hmac.compare_digest(expected, rmac):
            raise HandshakeError("initial R-MAC does not verify")
        self.r_mac = expected
        self.established = True

    # --- MAC chaining ---

    def _mac(self, message: bytes, iv: bytes) -> bytes:
        # every exchange of a session computes two of these: the padding and the XORs inline (ints), the
        # cipher contexts' `update` called directly
        n = len(message)
        if n % 16:
            message += b"\x80" + bytes(15 - n % 16)  # `pad`
            n = len(message)
        x = int.from_bytes(iv, "big")
        if n > 16:
            enc1 = self._mac1.encrypt
            for i in range(0, n - 16, 16):
                x = int.from_bytes(enc1((x ^ int.from_bytes(message[i : i + 16], "big")).to_bytes(16, "big")), "big")
        return self._mac2.encrypt((x ^ int.from_bytes(message[n - 16 :], "big")).to_bytes(16, "big"))

    def mac_command(self, signed: bytes) -> bytes:
        """The 4 MAC bytes of an outgoing command (chains C-MAC on the last R-MAC)."""
        self.c_mac = self._mac(signed, self.r_mac)
        return self.c_mac[:4]

    def verify_reply(self, signed: bytes, mac4: bytes) -> bool:
        """Check a reply's MAC against the last command's C-MAC; on success it becomes the new R-MAC."""
        full = self._mac(signed, self.c_mac)
        if not hmac.compare_digest(full[:4], mac4):
            return False
        self.r_mac = full
        return True

    # --- data blocks ---

    def _cbc_encrypt(self, data: bytes, iv: bytes) -> bytes:
        out = bytearray()
        enc = self._enc
        for i in range(0, len(data), 16):
            iv = enc.encrypt(_xor(iv, data[i : i + 16]))
            out += iv
        return bytes(out)

    def _cbc_decrypt(self, data: bytes, iv: bytes) -> bytes:
        plain = self._enc.decrypt(data)
        out = bytearray()
        for i in range(0, len(data), 16):
            out += _xor(plain[i : i + 16], iv)
            iv = data[i : i + 16]
        return bytes(out)

    def encrypt_command(self, data: bytes) -> bytes:
        """Encrypt a command's data block (IV = NOT last R-MAC)."""
        return self._cbc_encrypt(pad(data), _not(self.r_mac))

    def decrypt_reply(self, data: bytes) -> bytes | None:
        """Decrypt a reply's data block (IV = NOT the command's C-MAC); `None` if it does not decrypt."""
        if not data or len(data) % 16:
            return None
        return unpad(self._cbc_decrypt(data, _not(self.c_mac)))
