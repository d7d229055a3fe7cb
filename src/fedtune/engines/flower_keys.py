"""The TLS certificates (openssl) and SuperNode authentication keys (`cryptography`) of a Flower
deployment; `flower_deploy` starts the processes that use them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fedtune.errors import FedtuneError


def make_certificates(out: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throw-away CA and a server certificate for `host` (openssl), for TLS on the SuperLink."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = out / "ca.key", out / "ca.crt"
    key, csr, crt, ext = out / "server.key", out / "server.csr", out / "server.crt", out / "ext.cnf"

    def ssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise FedtuneError(f"openssl {args[0]} failed: {r.stderr.strip()[-300:]}")

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
        "-days",
        "2",
        "-subj",
        "/CN=fedtune-test-ca",
    )
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    ext.write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    ssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return {"ca": ca_crt, "cert": crt, "key": key}


def make_node_keys(out: Path, num_nodes: int) -> list[tuple[Path, Path]]:
    """One P-384 key pair per SuperNode (OpenSSH format, as Flower reads them): the private key
    stays with the node (`--auth-supernode-private-key`), the public key is registered on the
    SuperLink (`flwr supernode register`). Equivalent to `ssh-keygen -t ecdsa -b 384 -N ""`."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"node-{i}", out / f"node-{i}.pub"
        priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
        priv.chmod(0o600)
        pub.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
        pairs.append((priv, pub))
    return pairs
