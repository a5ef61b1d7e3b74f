"""Throw-away TLS certificates for the local secure broker and Qdrant server: a certificate
authority and one server certificate it signs for 127.0.0.1 and localhost, made with the
``openssl`` command (Debian's ``openssl`` package; the JDK's ``keytool`` cannot write a PEM
private key, which Qdrant needs). Clients trust ``ca``; servers present ``cert`` and ``key``.

For tests and development only: the keys are unencrypted and live two days."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loupe.consumers.errors import LoupeError


class CertificateError(LoupeError):
    """The test certificates could not be made."""


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the authority's certificate: what a client trusts
    cert: Path  # the server's certificate, signed by the authority
    key: Path  # the server's private key (PKCS#8, unencrypted)


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError(
            "`openssl` is not on PATH; it makes the test certificates (Debian: "
            "`apt-get install openssl`)"
        )
    done = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CertificateError(f"openssl {args[0]} failed: {done.stderr.strip()[-1000:]}")


def make_certificates(directory: Path, days: int = 2) -> Certificates:
    """A new authority and a server certificate for 127.0.0.1/localhost under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    made = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
        "-subj", "/CN=Loupe test CA", "-keyout", "ca.key", "-out", made.ca.name,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", made.key.name, "-out", "server.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", made.ca.name, "-CAkey", "ca.key",
        "-CAcreateserial", "-days", str(days), "-extfile", "server.ext", "-out", made.cert.name,
        cwd=directory,
    )  # fmt: skip
    return made
