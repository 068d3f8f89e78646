"""Certificates and node keys made with ``cryptography``, loaded back as Flower loads them."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedkd.deploy.security import make_certificates, make_node_key, san_entries
from fedkd.errors import ConfigError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return make_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost", "::1"])


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(certs) -> None:
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)

    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc > server.not_valid_before_utc


def test_keys_are_private_pem_and_match_their_certificates(certs) -> None:
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    ca_key = serialization.load_pem_private_key((certs.ca_cert.parent / "ca.key").read_bytes(),
                                                password=None)

    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == _load(certs.server_cert).public_key()
    assert ca_key.public_key() == _load(certs.ca_cert).public_key()
    assert oct(certs.server_key.stat().st_mode)[-3:] == "600"
    assert oct((certs.ca_cert.parent / "ca.key").stat().st_mode)[-3:] == "600"
    assert certs.superlink_args() == [
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key)]


def test_python_tls_accepts_the_pair(certs) -> None:
    """The SuperLink's TLS stack (OpenSSL through ``ssl``) loads the files and trusts the CA."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.server_cert, certs.server_key)
    client = ssl.create_default_context(cafile=str(certs.ca_cert))

    assert client.get_ca_certs()[0]["subject"] == ((("organizationName", "fedkd"),),
                                                   (("commonName", "fedkd-ca"),))


def test_san_entries() -> None:
    assert san_entries(["::1", "host", "10.0.0.5"]) == "IP:::1,DNS:host,IP:10.0.0.5"
    with pytest.raises(ConfigError, match="at least one host"):
        san_entries([])
    with pytest.raises(ConfigError, match="at least one host"):
        make_certificates("unused", [])


def test_node_keys_are_openssh_ecdsa_p384_as_flower_loads_them(tmp_path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    key_path, pub_path = make_node_key(tmp_path, "node-0")
    # flower-supernode: load_ssh_private_key; flwr supernode register: load_ssh_public_key
    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())

    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert public == key.public_key() and uses_nist_ec_curve(public)
    assert try_load_public_key(pub_path) == public_key_to_bytes(public)
    assert key_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    line = pub_path.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" node-0\n")
    assert oct(key_path.stat().st_mode)[-3:] == "600"


def test_a_node_key_is_replaced_not_reused(tmp_path) -> None:
    first = make_node_key(tmp_path, "node-1")[1].read_text()

    second = make_node_key(tmp_path, "node-1")[1].read_text()

    assert first != second


def test_flower_supernode_loads_the_private_key(tmp_path) -> None:
    """Flower's own ``--auth-supernode-private-key`` check accepts the file."""
    import argparse

    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key_path, pub_path = make_node_key(tmp_path, "node-2")
    args = argparse.Namespace(auth_supernode_private_key=str(key_path),
                              auth_supernode_public_key=None)

    private, public = _try_setup_client_authentication(args)

    assert public == serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private.curve, ec.SECP384R1)
