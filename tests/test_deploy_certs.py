"""deploy.certs: the CA, the SuperLink certificate and the SuperNode key pairs."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from deploy.certs import CertificateError, Certificates, generate, main, make_node_key, server_cert_names


def test_generate_makes_a_consistent_set(tmp_path):
    certs = generate(tmp_path / "c", 2, names=("localhost", "127.0.0.1", "superlink", "edge.example"))
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the server certificate is signed by the CA
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(),
                           server.signature_hash_algorithm)
    assert server.issuer == ca.subject
    assert set(server_cert_names(certs.server_cert)) == {"localhost", "127.0.0.1", "superlink", "edge.example"}
    for i in range(2):
        private = load_ssh_private_key(certs.node_key(i).read_bytes(), password=None)
        public = load_ssh_public_key(certs.node_public_key(i).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert try_load_public_key(certs.node_public_key(i))  # what `flwr supernode register` reads
    for private in (certs.ca_key, certs.server_key, certs.node_key(0), certs.node_key(1)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (certs.directory / ".gitignore").read_text().strip().endswith("*")


def test_generate_keeps_what_exists_and_adds_keys(tmp_path):
    first = generate(tmp_path, 1)
    before = {p: p.read_bytes() for p in (first.ca_cert, first.server_cert, first.node_key(0))}
    second = generate(tmp_path, 3)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert second.node_key(2).is_file()
    third = generate(tmp_path, 1, force=True)
    assert third.ca_cert.read_bytes() != before[first.ca_cert]


def test_generate_refuses_a_certificate_for_other_names(tmp_path):
    generate(tmp_path, 0, names=("localhost",))
    with pytest.raises(CertificateError, match="not valid for superlink"):
        generate(tmp_path, 0, names=("localhost", "superlink"))


def test_users_ca_without_its_key(tmp_path):
    """A user's CA whose key lives elsewhere: node keys can be added, a server cert can't be made."""
    certs = generate(tmp_path, 0)
    certs.ca_key.unlink()
    assert generate(tmp_path, 2).node_key(1).is_file()
    certs.server_cert.unlink()
    with pytest.raises(CertificateError, match="no .*ca.key to sign"):
        generate(tmp_path, 2)


def test_check_names_missing_files(tmp_path):
    with pytest.raises(CertificateError, match="supernode-0"):
        Certificates(tmp_path, 1).check()


def test_make_node_key_comment(tmp_path):
    pub = make_node_key(tmp_path / "k", comment="device-7")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and pub.read_text().strip().endswith("device-7")


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--nodes", "1", "--name", "10.0.0.5"]) == 0
    assert "10.0.0.5" in capsys.readouterr().out
    assert "10.0.0.5" in server_cert_names(tmp_path / "server.pem")
    assert main(["--out", str(tmp_path), "--nodes", "-1"]) == 2
