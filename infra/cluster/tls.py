"""HTTPS for the local MLflow server (``up --tls``): a certificate authority made for this cluster and a
server certificate it signs for the tracking host's address, both kept in the state folder (``tls/``) so a
restarted server keeps them. Clients verify the server with the CA (``MLFLOW_TRACKING_SERVER_CERT_PATH``,
which MLflow's client reads); the private keys are written 0600. Made with ``cryptography`` (already
installed with MLflow) rather than by calling ``openssl``: no subprocess, no config file.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from infra.cluster.credentials import write_private

CA_FILE = "ca.pem"
CERT_FILE = "mlflow.pem"
KEY_FILE = "mlflow-key.pem"
VALID_DAYS = 365


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _ca(common_name: str):
    """A new CA: (private key, self-signed certificate, valid VALID_DAYS, may sign server certificates)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    key, name = _key(), _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server(ca_key, ca_cert, addresses: set):
    """A server key and its certificate for ``addresses`` (IP SANs), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mlflow"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(a) for a in sorted(addresses, key=str)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_server_files(folder: Path, ca_cert, key, cert) -> tuple[Path, Path, Path]:
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = folder / CA_FILE, folder / CERT_FILE, folder / KEY_FILE
    write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert_path, key_path


def server_certificate(folder: Path, addresses: list[str], cluster_id: str) -> tuple[Path, Path, Path]:
    """``(ca.pem, mlflow.pem, mlflow-key.pem)`` in ``folder``: made once (a CA named after the cluster and a
    server certificate for ``addresses``, IP SANs), then reused while they cover ``addresses``. The CA's
    key is not kept: nothing else can be signed with it."""
    from cryptography import x509

    ca_path, cert_path, key_path = folder / CA_FILE, folder / CERT_FILE, folder / KEY_FILE
    wanted = {ipaddress.ip_address(a) for a in addresses}
    if ca_path.is_file() and cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = set(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.IPAddress
            )
        )
        if wanted <= sans:
            return ca_path, cert_path, key_path
    ca_key, ca_cert = _ca(f"vae local cluster {cluster_id} CA")
    return _write_server_files(folder, ca_cert, *_server(ca_key, ca_cert, wanted))


def new_ca_json(common_name: str) -> str:
    """A new CA as JSON ``{"cert": PEM, "key": PEM}``: what a secret store keeps for :func:`issue_from_ca`
    (the team CA of the `ray up` shape)."""
    import json

    from cryptography.hazmat.primitives import serialization

    key, cert = _ca(common_name)
    return json.dumps({"cert": cert.public_bytes(serialization.Encoding.PEM).decode(), "key": _pem_key(key)})


def issue_from_ca(ca_json: str, addresses: list[str], folder: Path) -> tuple[Path, Path, Path]:
    """``(ca.pem, mlflow.pem, mlflow-key.pem)`` in ``folder``: a new server certificate for ``addresses``
    signed by the CA in ``ca_json`` (:func:`new_ca_json`'s form). The CA's key is used in memory only.

    Raises:
        ValueError: ``ca_json`` is not such a CA, or an address is not an IP address.
    """
    import json

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        pair = json.loads(ca_json)
        ca_cert = x509.load_pem_x509_certificate(pair["cert"].encode())
        ca_key = serialization.load_pem_private_key(pair["key"].encode(), password=None)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f'not a CA as {{"cert": PEM, "key": PEM}}: {error}') from None
    wanted = {ipaddress.ip_address(a) for a in addresses}
    return _write_server_files(folder, ca_cert, *_server(ca_key, ca_cert, wanted))


def client_context(ca_path: Path | None):
    """An ``ssl`` context that trusts ``ca_path`` (None: the default context) for urllib."""
    import ssl

    return ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
