"""TLS certificates and SuperNode keys for a secure federation.

``python -m deploy.certs --out .certs --nodes 2 [--name superlink --name my.host.example]``

writes, into ``--out``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` private; only
  ``ca.crt`` travels: to every SuperNode and to the ``flwr`` CLI);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and every ``--name`` (the host names or IPs the SuperNodes and the CLI
  use to reach the SuperLink; ``superlink`` is the service name in docker-compose.yml);
* ``supernode-<i>`` / ``supernode-<i>.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read). The private key stays on its device; the SuperLink only ever sees the public key;
* ``.gitignore`` (``*``), so that none of this ends up in a repository or an app bundle.

Existing files are kept (run it again with a larger ``--nodes`` to add keys); ``--force`` makes
everything new. Only the ``cryptography`` package (a Flower dependency) is needed, no openssl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "superlink")
"""Names the SuperLink certificate is valid for unless told otherwise (superlink: the compose service)."""


class CertificateError(ValueError):
    """Missing or unusable certificate material."""


@dataclass(frozen=True)
class Certificates:
    """Paths of everything a secure federation needs."""

    directory: Path
    num_nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def node_key(self, index: int) -> Path:
        """Private key of SuperNode ``index`` (its ``.pub`` sits next to it)."""
        return self.directory / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        return public_key_path(self.node_key(index))

    def check(self) -> "Certificates":
        """Raise :class:`CertificateError` naming every file that is missing."""
        needed = [self.ca_cert, self.server_cert, self.server_key]
        for i in range(self.num_nodes):
            needed += [self.node_key(i), self.node_public_key(i)]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise CertificateError(
                f"certificates in {self.directory}: missing {', '.join(missing)}; create them with "
                f"`python -m deploy.certs --out {self.directory} --nodes {self.num_nodes}`")
        return self


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private files are created 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(cert_path: Path, key_path: Path, days: int = 365) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name("fedprune CA")).issuer_name(_name("fedprune CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_server_cert(cert_path: Path, key_path: Path, ca_cert_path: Path, ca_key_path: Path,
                     names: Sequence[str] = DEFAULT_NAMES, days: int = 365) -> None:
    """A SuperLink certificate signed by the CA, valid for ``names`` (DNS names or IP addresses)."""
    if not names:
        raise CertificateError("the SuperLink certificate needs at least one name (host name or IP)")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_key(private_path: Path, comment: str = "") -> Path:
    """An ECDSA P-384 key pair in OpenSSH format; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    pub_path = public_key_path(private_path)
    _write(pub_path, public + (f" {comment}".encode() if comment else b"") + b"\n", private=False)
    return pub_path


def server_cert_names(cert_path: Path) -> list[str]:
    """The DNS names and IPs a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def generate(directory: Path | str, num_nodes: int, names: Sequence[str] = DEFAULT_NAMES,
             days: int = 365, force: bool = False) -> Certificates:
    """Create whatever of the CA, server certificate and node keys is missing in ``directory``."""
    if num_nodes < 0:
        raise CertificateError(f"--nodes: got {num_nodes}; allowed: >= 0")
    certs = Certificates(Path(directory).expanduser().resolve(), num_nodes)
    certs.directory.mkdir(parents=True, exist_ok=True)
    _write(certs.directory / ".gitignore", b"# private keys and certificates: never commit them\n*\n", False)
    if force or not certs.ca_cert.is_file():
        make_ca(certs.ca_cert, certs.ca_key, days)
        force = True  # a new CA invalidates the old server certificate
    if force or not (certs.server_cert.is_file() and certs.server_key.is_file()):
        if not certs.ca_key.is_file():  # a CA of the user's, whose key stays elsewhere
            raise CertificateError(f"{certs.server_cert} or {certs.server_key} is missing and there is no "
                                   f"{certs.ca_key} to sign a new one; put the SuperLink's certificate "
                                   "and key there, or run with --force to make a new CA")
        make_server_cert(certs.server_cert, certs.server_key, certs.ca_cert, certs.ca_key, names, days)
    elif missing := [n for n in names if n not in server_cert_names(certs.server_cert)]:
        raise CertificateError(
            f"{certs.server_cert} is not valid for {', '.join(missing)} (it covers "
            f"{', '.join(server_cert_names(certs.server_cert))}); run again with --force")
    for i in range(num_nodes):
        if force or not (certs.node_key(i).is_file() and certs.node_public_key(i).is_file()):
            make_node_key(certs.node_key(i), comment=f"supernode-{i}")
    return certs.check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".certs", help="directory to write into (default .certs)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to create (default 2)")
    parser.add_argument("--name", action="append", default=[],
                        help="extra host name or IP the SuperLink is reached at (repeatable)")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        certs = generate(args.out, args.nodes, (*DEFAULT_NAMES, *args.name), args.days, args.force)
    except CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA:        {certs.ca_cert}")
    print(f"SuperLink: {certs.server_cert} ({', '.join(server_cert_names(certs.server_cert))})")
    for i in range(certs.num_nodes):
        print(f"SuperNode {i}: {certs.node_key(i)} (register {certs.node_public_key(i)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
