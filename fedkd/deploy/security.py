"""TLS certificates (openssl) and SuperNode authentication keys (ssh-keygen), scripted.

`make_certificates` writes a private CA and a SuperLink certificate signed by it, valid for the
addresses the SuperNodes will dial (IP addresses and/or DNS names). `make_node_key` writes one
ECDSA P-384 key pair per SuperNode; its public half is registered with the SuperLink
(``flwr supernode register``) and the SuperNode signs its requests with the private half.
The exact commands are listed in docs/deploy.md.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedkd.errors import ConfigError

log = logging.getLogger(__name__)


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
        raise ConfigError(f"'{name}' is not installed (needed to create certificates and keys)")
    return path


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


def san_entries(hosts: list[str]) -> str:
    """``subjectAltName`` value for the SuperLink's addresses, e.g. ``IP:10.0.0.5,DNS:fl.lan``."""
    if not hosts:
        raise ConfigError("the SuperLink certificate needs at least one host (IP address or name)")
    entries = []
    for host in hosts:
        try:
            entries.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def make_certificates(out_dir: str | Path, hosts: list[str], days: int = 365) -> Certificates:
    """A private CA (``ca.crt``, ``ca.key``) and a SuperLink certificate for `hosts`.

    Keys are ECDSA P-256; the CA key never leaves the machine that runs this.
    """
    openssl = _tool("openssl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = out / "ca.key", out / "ca.crt"
    key, csr, cert = out / "server.key", out / "server.csr", out / "server.pem"
    ext = out / "server.ext"
    ext.write_text(f"subjectAltName={san_entries(hosts)}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert), "-days", str(days),
          "-subj", "/O=fedkd/CN=fedkd-ca"])
    _run([openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/O=fedkd/CN={hosts[0]}"])
    _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
          "-CAcreateserial", "-out", str(cert), "-days", str(days), "-sha256",
          "-extfile", str(ext)])
    for file in (ca_key, key):
        file.chmod(0o600)
    log.info("TLS: CA %s, SuperLink certificate %s for %s", ca_cert, cert, hosts)
    return Certificates(ca_cert=ca_cert, server_cert=cert, server_key=key)


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair ``<name>`` / ``<name>.pub`` for one SuperNode."""
    key = Path(out_dir) / name
    key.parent.mkdir(parents=True, exist_ok=True)
    if key.exists():
        key.unlink()
        Path(f"{key}.pub").unlink(missing_ok=True)
    _run([_tool("ssh-keygen"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name,
          "-f", str(key)])
    return key, Path(f"{key}.pub")


def register_node(public_key: Path, connection: str, env: dict[str, str]) -> str:
    """``flwr supernode register <public_key> <connection>``; return Flower's answer."""
    flwr = shutil.which("flwr", path=env.get("PATH")) or _tool("flwr")
    done = subprocess.run([str(flwr), "supernode", "register", str(public_key), connection],
                          capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"flwr supernode register {public_key} failed: "
                           f"{(done.stdout + done.stderr).strip()}")
    return done.stdout.strip()
