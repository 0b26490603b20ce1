"""TLS for the local cluster's NATS and Redis: a CA of its own in the state directory.

``membrane up`` makes a CA once (``tls/ca.pem``, its key ``tls/ca-key.pem``) and a server
certificate signed by it for the addresses the servers listen on (IP subject alternative names,
so clients verify the server by the address they dial). Keys are 0600 from their first byte, the
directory 0700. A server certificate is issued again when the addresses change (a different
underlay range); the CA stays, so clients holding ``ca.pem`` keep trusting the cluster. The
keys are made with the ``openssl`` command (Debian's, installed with the system).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from membrane.servers import ServerTLS, require_binary, write_secret
from shared.errors import Unavailable

DAYS = 3650  # a local cluster's CA: long-lived, renewed by deleting the directory
CURVE = "prime256v1"


def paths(directory: Path) -> ServerTLS:
    return ServerTLS(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")


def ensure(directory: Path, addresses: list[str]) -> ServerTLS:
    """The CA (made once) and a server certificate for ``addresses`` (IPv4 literals)."""
    files = paths(directory)
    ca_key = ensure_ca(directory, "membrane local CA")
    wanted = sorted(set(addresses))
    stamp = directory / "server.addresses"
    if files.cert.exists() and files.key.exists() and _read(stamp) == wanted:
        return files
    key = new_key()
    write_secret(files.key, key)
    files.cert.write_bytes(sign(files.ca, ca_key, key, [f"IP:{a}" for a in wanted]))
    stamp.write_text("\n".join(wanted) + "\n")
    return files


def ensure_ca(directory: Path, name: str) -> Path:
    """``directory``/ca.pem, made once with its key (ca-key.pem, 0600, returned); a new CA
    removes the server certificate the old one signed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    files = paths(directory)
    ca_key = directory / "ca-key.pem"
    if not (files.ca.exists() and ca_key.exists()):
        key = new_key()
        write_secret(ca_key, key)
        cert = _openssl(
            "req", "-x509", "-new", "-key", "/dev/stdin", "-days", str(DAYS),
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            stdin=key,
        )  # fmt: skip
        files.ca.write_bytes(cert)
        files.cert.unlink(missing_ok=True)  # signed by a CA that is gone
    return ca_key


def sign(ca: Path, ca_key: Path, key: bytes, names: list[str]) -> bytes:
    """A server certificate (PEM) for ``key``, signed by the CA, valid for ``names``
    (subject alternative names as openssl writes them: ``IP:10.0.0.1``, ``DNS:nats``)."""
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "server.csr"
        extensions = Path(tmp) / "ext.cnf"
        csr.write_bytes(
            _openssl("req", "-new", "-key", "/dev/stdin", "-subj", "/CN=membrane", stdin=key)
        )
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName={','.join(names)}\n"
        )
        return _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-CAserial", str(Path(tmp) / "ca.srl"), "-days", str(DAYS),
            "-extfile", str(extensions),
        )  # fmt: skip


def new_key() -> bytes:
    """A private key (PEM): EC P-256."""
    return _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{CURVE}")


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(
        [require_binary("openssl"), *args], input=stdin, capture_output=True, check=False
    )
    if result.returncode != 0:
        raise Unavailable(f"openssl {args[0]} failed: {result.stderr.decode().strip()}")
    return result.stdout


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []
