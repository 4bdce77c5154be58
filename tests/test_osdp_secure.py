"""Secure Channel crypto: key derivation, cryptograms, MAC chaining and data blocks (pure)."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from edge.readers.osdp import secure as s

RND_A = bytes(range(8))
RND_B = bytes(range(8, 16))


def _ecb(key: bytes, block: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def _cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return e.update(data) + e.finalize()


def test_default_key_is_scbk_d() -> None:
    assert s.SCBK_DEFAULT.hex() == "303132333435363738393a3b3c3d3e3f"


def test_session_keys_golden() -> None:
    # Derived with SCBK-D and RND.A = 00..07 (values pinned; checked against a plain AES implementation
    # below and, live, against libosdp in test_osdp_bus.py).
    enc, mac1, mac2 = s.session_keys(s.SCBK_DEFAULT, RND_A)
    assert enc.hex() == "f9b24c31d5983826360a50e39ebd5f16"
    assert mac1.hex() == "f9fb14d51205b9024074befb5a486e44"
    assert mac2.hex() == "b363df851213de3a4b50d9029a973ad7"
    assert enc == _ecb(s.SCBK_DEFAULT, b"\x01\x82" + RND_A[:6] + bytes(8))
    assert mac1 == _ecb(s.SCBK_DEFAULT, b"\x01\x01" + RND_A[:6] + bytes(8))
    assert mac2 == _ecb(s.SCBK_DEFAULT, b"\x01\x02" + RND_A[:6] + bytes(8))


def test_cryptograms_and_initial_rmac_golden() -> None:
    enc, mac1, mac2 = s.session_keys(s.SCBK_DEFAULT, RND_A)
    client = s.client_cryptogram(enc, RND_A, RND_B)
    server = s.server_cryptogram(enc, RND_A, RND_B)
    assert client.hex() == "e59a2bdc2d92b77c47caac2a74b3d0b0"
    assert server.hex() == "be67621f9b566c4386bc55dc02642014"
    assert s.initial_rmac(mac1, mac2, server).hex() == "616bb9f81a0ffd628d274539b4d10a86"


def _established(scbk: bytes = s.SCBK_DEFAULT) -> s.SecureChannel:
    ch = s.SecureChannel(scbk, rnd_a=RND_A)
    enc, mac1, mac2 = s.session_keys(scbk, RND_A)
    server = ch.check_ccrypt(RND_B, s.client_cryptogram(enc, RND_A, RND_B))
    ch.check_rmac_i(s.initial_rmac(mac1, mac2, server))
    return ch


def test_handshake_rejects_a_wrong_key() -> None:
    ch = s.SecureChannel(bytes(16), rnd_a=RND_A)
    enc, _, _ = s.session_keys(s.SCBK_DEFAULT, RND_A)
    try:
        ch.check_ccrypt(RND_B, s.client_cryptogram(enc, RND_A, RND_B))
    except s.HandshakeError:
        pass
    else:
        raise AssertionError("cryptogram of another key accepted")
    assert not ch.established


def test_rmac_i_must_verify() -> None:
    ch = s.SecureChannel(s.SCBK_DEFAULT, rnd_a=RND_A)
    enc, _, _ = s.session_keys(s.SCBK_DEFAULT, RND_A)
    ch.check_ccrypt(RND_B, s.client_cryptogram(enc, RND_A, RND_B))
    try:
        ch.check_rmac_i(bytes(16))
    except s.HandshakeError:
        pass
    else:
        raise AssertionError("bad R-MAC_I accepted")
    assert not ch.established


def test_mac_chains_and_matches_a_plain_cbc_mac() -> None:
    ch = _established()
    _, mac1, mac2 = s.session_keys(s.SCBK_DEFAULT, RND_A)
    rmac_i = ch.r_mac
    msg = bytes.fromhex("53 01 0e 00 05 02 15 60")  # a POLL header with SCS_15
    mac4 = ch.mac_command(msg)
    padded = s.pad(msg)
    assert len(padded) == 16
    expected = _ecb(mac2, bytes(a ^ b for a, b in zip(rmac_i, padded, strict=True)))
    assert mac4 == expected[:4] and ch.c_mac == expected
    # a two-block message: all but the last block with S-MAC1, the last with S-MAC2
    long = bytes(range(20))
    ch2 = _established()
    ch2.mac_command(long)
    p = s.pad(long)
    iv2 = _cbc(mac1, rmac_i, p[:16])[-16:]
    assert ch2.c_mac == _ecb(mac2, bytes(a ^ b for a, b in zip(iv2, p[16:], strict=True)))


def test_reply_mac_verifies_and_advances_only_when_right() -> None:
    cp = _established()
    pd = _established()  # same keys: stands in for the PD's side
    cmd = b"\x53\x01\x0e\x00\x05\x02\x15\x60"
    pd.mac_command(cmd)  # PD computes the same C-MAC
    cp.mac_command(cmd)
    reply = b"\x53\x81\x0e\x00\x05\x02\x16\x40"
    good = pd._mac(reply, pd.c_mac)[:4]
    before = cp.r_mac
    assert not cp.verify_reply(reply, bytes(4) if good != bytes(4) else b"\x01\x02\x03\x04")
    assert cp.r_mac == before
    assert cp.verify_reply(reply, good)
    assert cp.r_mac != before


def test_data_blocks_round_trip_with_the_spec_ivs() -> None:
    cp = _established()
    enc, _, _ = s.session_keys(s.SCBK_DEFAULT, RND_A)
    data = b"\x00\x00\x02\x1e\x00\x02\x00\x1e\x00\x00\x00\x00\x00\x00"  # an LED record
    block = cp.encrypt_command(data)
    not_rmac = bytes(0xFF - b for b in cp.r_mac)
    assert block == _cbc(enc, not_rmac, s.pad(data))
    # a reply block is encrypted with IV = NOT C-MAC
    cp.mac_command(b"x" * 8)
    not_cmac = bytes(0xFF - b for b in cp.c_mac)
    assert cp.decrypt_reply(_cbc(enc, not_cmac, s.pad(b"card"))) == b"card"
    assert cp.decrypt_reply(_cbc(enc, not_cmac, bytes(16))) is None  # no 0x80 marker
    assert cp.decrypt_reply(b"\x00" * 15) is None


def test_padding() -> None:
    assert s.pad(b"") == b"\x80" + bytes(15)
    assert len(s.pad(bytes(16))) == 32
    assert s.unpad(s.pad(b"abc")) == b"abc"
    assert s.unpad(bytes(16)) is None


def test_repr_hides_keys() -> None:
    ch = _established(bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90"))
    assert "a1b2" not in repr(ch).lower()
