"""TLS certificates and SuperNode authentication keys, made in Python (``cryptography``).

`make_certificates` writes a private CA and a SuperLink certificate signed by it, valid for the
addresses the SuperNodes will dial (IP addresses and/or DNS names, as subjectAltName entries).
`make_node_key` writes one ECDSA P-384 key pair per SuperNode in OpenSSH format (what
``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``); its public
half is registered with the SuperLink (``flwr supernode register``) and the SuperNode signs its
requests with the private half. No ``openssl`` or ``ssh-keygen`` is needed; docs/deploy.md lists
the equivalent commands.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedkd.errors import ConfigError

log = logging.getLogger(__name__)

TLS_CURVE = ec.SECP256R1
"""Curve of the CA and SuperLink keys (P-256)."""
NODE_CURVE = ec.SECP384R1
"""Curve of the SuperNode authentication keys (P-384, one of the NIST curves Flower accepts)."""


@dataclass(frozen=True)
class Certificates:
    """The files a TLS SuperLink and its SuperNodes need."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` options."""
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"'{name}' is not installed")
    return path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to `path`; a private file is created with mode 0600 from the start."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _general_names(hosts: list[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise ConfigError("the SuperLink certificate needs at least one host (IP address or name)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def san_entries(hosts: list[str]) -> str:
    """``subjectAltName`` value for the SuperLink's addresses, e.g. ``IP:10.0.0.5,DNS:fl.lan``."""
    return ",".join(f"IP:{n.value}" if isinstance(n, x509.IPAddress) else f"DNS:{n.value}"
                    for n in _general_names(hosts))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, days: int,
                 extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """A certificate of `public_key` signed by `issuer_key` (SHA-256), valid from a minute ago."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _usage(**allowed: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                           "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                           "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**{**flags, **allowed})


def make_certificates(out_dir: str | Path, hosts: list[str], days: int = 365) -> Certificates:
    """A private CA (``ca.crt``, ``ca.key``) and a SuperLink certificate for `hosts`.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (keys: PKCS#8 PEM,
        mode 0600; the CA key never leaves the machine that runs this).
    hosts : list of str
        Addresses the SuperNodes dial: IP addresses and/or DNS names (subjectAltName entries).
    days : int
        Validity of both certificates.

    Returns
    -------
    Certificates
        The CA certificate and the SuperLink's certificate and key.
    """
    names = _general_names(hosts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(TLS_CURVE()), ec.generate_private_key(TLS_CURVE())
    ca_name = _name("fedkd-ca")
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, days, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_usage(key_cert_sign=True, crl_sign=True), True)])
    server = _certificate(_name(hosts[0]), key.public_key(), ca_name, ca_key, days, [
        (x509.SubjectAlternativeName(names), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    files = Certificates(ca_cert=out / "ca.crt", server_cert=out / "server.pem",
                         server_key=out / "server.key")
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(files.server_key, _pem_key(key), private=True)
    _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    _write(files.server_cert, server.public_bytes(serialization.Encoding.PEM))
    log.info("TLS: CA %s, SuperLink certificate %s for %s", files.ca_cert, files.server_cert,
             san_entries(hosts))
    return files


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair ``<name>`` / ``<name>.pub`` for one SuperNode.

    Parameters
    ----------
    out_dir : str or Path
        Folder of the two files (an existing pair of that name is replaced).
    name : str
        File name of the private key; also the public key's comment.

    Returns
    -------
    tuple of Path
        The private key (OpenSSH format, mode 0600, for ``--auth-supernode-private-key``) and the
        public key (one OpenSSH line ``ecdsa-sha2-nistp384 ... <name>``, for
        ``flwr supernode register``).
    """
    key_path = Path(out_dir) / name
    pub_path = Path(f"{key_path}.pub")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(NODE_CURVE())
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(pub_path, public + f" {name}\n".encode())
    return key_path, pub_path


def register_node(public_key: Path, connection: str, env: dict[str, str]) -> str:
    """``flwr supernode register <public_key> <connection>``; return Flower's answer."""
    flwr = shutil.which("flwr", path=env.get("PATH")) or _tool("flwr")
    done = subprocess.run([str(flwr), "supernode", "register", str(public_key), connection],
                          capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"flwr supernode register {public_key} failed: "
                           f"{(done.stdout + done.stderr).strip()}")
    return done.stdout.strip()
