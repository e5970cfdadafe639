"""A real S3-compatible server for the test suite: moto's server mode on 127.0.0.1.

The `s3_endpoint` fixture (session scope) starts moto on a free loopback port and
points every AWS client of this process (and of the subprocesses it starts) at it
through environment variables: dummy credentials, the endpoint URL, and the
instance-metadata service switched off, so no request can reach a real AWS
endpoint. `s3_bucket` gives each test a fresh bucket and its `s3://` URL.
Tests skip with the reason when moto or s3fs is missing or the server cannot start.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator

import pytest

HOST = "127.0.0.1"

# Environment every AWS client reads; set before the server or any client starts.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "ladle-test",
    "AWS_SECRET_ACCESS_KEY": "ladle-test",
    "AWS_SESSION_TOKEN": "ladle-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1, running for the whole session."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"S3 tests need moto[server] and s3fs (pip install -e '.[dev]'): {exc}")
    saved = {k: os.environ.get(k) for k in (*_AWS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(_AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    try:
        server.start()
    except OSError as exc:
        pytest.skip(f"cannot start the moto S3 server on {HOST}:{port}: {exc}")
    endpoint = f"http://{HOST}:{port}"
    # botocore (and so s3fs) reads the endpoint from here, in this process and in subprocesses.
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """`s3://<fresh bucket>` on the moto server; emptied and removed afterwards."""
    import s3fs

    name = f"ladle-{secrets.token_hex(6)}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    try:
        yield f"s3://{name}"
    finally:
        fs.rm(name, recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()
