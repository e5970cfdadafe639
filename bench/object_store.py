"""Averaging checkpoints that live on an S3 server: streamed ranged reads vs local files vs download-first.

    python bench/object_store.py [--params 4e6] [--members 5] [--repeat 3]

The default (5 checkpoints of 16 MB) takes well under a minute; `--params 25e6`
(5 x 100 MB) is the larger run. Starts a moto S3 server on 127.0.0.1 in a
subprocess (nothing else is contacted: dummy credentials, the instance-metadata
service off), with a WSGI middleware that counts every response byte it sends,
and writes `--members` safetensors checkpoints both to a local folder and to
the bucket. Then, --repeat rounds each, medians reported:

  local:     ladle.average_to_file over the local files;
  streamed:  ladle.average_to_file over the s3:// URLs (safetensors header, then
             each tensor by ranged reads; nothing downloaded whole);
  download:  s3fs `get` of every file to a temporary folder, then the local
             average (what one would do without URL support).

Reports time and bytes the server sent (HTTP bodies) against the checkpoints'
total size; the target is streamed bytes <= the checkpoints' size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HOST = "127.0.0.1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
COUNTER_PATH = "/__bench_bytes_sent__"


def serve(port: int) -> None:
    """The server process: moto's S3 app behind a middleware that counts body bytes sent."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    sent = {"data": 0, "other": 0}  # object bodies (GET without a query), everything else
    lock = threading.Lock()

    def counted(body, kind):  # type: ignore[no-untyped-def]
        for chunk in body:
            with lock:
                sent[kind] += len(chunk)
            yield chunk

    def counting(environ, start_response):  # type: ignore[no-untyped-def]
        if environ.get("PATH_INFO") == COUNTER_PATH:
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(sent).encode()]
        data = environ.get("REQUEST_METHOD") == "GET" and not environ.get("QUERY_STRING")
        return counted(app(environ, start_response), "data" if data else "other")

    make_server(HOST, port, counting, threaded=True).serve_forever()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def bytes_sent(endpoint: str) -> tuple[int, int]:
    """(object data bytes, other response bytes) the server has sent so far."""
    with urllib.request.urlopen(endpoint + COUNTER_PATH) as response:
        counts = json.loads(response.read())
    return int(counts["data"]), int(counts["other"])


def make_members(n: int, params: int, folder: str) -> list[str]:
    import torch
    from safetensors.torch import save_file

    width = 1024
    rows = max(1, params // (4 * width))
    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        tensors = {f"layer{j}.weight": torch.randn(rows, width, generator=generator) for j in range(4)} | {
            f"layer{j}.bias": torch.randn(width, generator=generator) for j in range(4)
        }
        path = os.path.join(folder, f"member{i}.safetensors")
        save_file(tensors, path)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=4e6, help="float32 parameters per checkpoint")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0

    os.environ.update(AWS_ENV)
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=os.environ)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    work = tempfile.mkdtemp(prefix="ladle-bench-s3-")
    try:
        for _ in range(100):
            try:
                bytes_sent(endpoint)
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        import ladle
        from ladle.store import ranged as ladle_ranged

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        os.makedirs(os.path.join(work, "local"))
        local = make_members(args.members, int(args.params), os.path.join(work, "local"))
        urls = []
        for path in local:
            url = f"s3://bench/{os.path.basename(path)}"
            fs.put(path, url)
            urls.append(url)
        total = sum(os.path.getsize(p) for p in local)

        def run_local() -> None:
            ladle.average_to_file(local, os.path.join(work, "out-local.safetensors"), force=True)

        def run_streamed() -> None:
            ladle.average_to_file(urls, os.path.join(work, "out-streamed.safetensors"), force=True)

        def run_download() -> None:
            folder = os.path.join(work, "download")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            fs.get(urls, folder + "/")
            files = [os.path.join(folder, os.path.basename(u)) for u in urls]
            ladle.average_to_file(files, os.path.join(work, "out-download.safetensors"), force=True)
            shutil.rmtree(folder)

        results: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeat):
            for name, fn in (("local", run_local), ("streamed", run_streamed), ("download", run_download)):
                # Each round starts cold, as a new process would: no object headers kept from before.
                ladle_ranged._HEADS.clear()
                data_before, other_before = bytes_sent(endpoint)
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
                data_after, other_after = bytes_sent(endpoint)
                entry = results.setdefault(name, {"seconds": [], "bytes": [], "other": []})
                entry["seconds"].append(seconds)
                entry["bytes"].append(data_after - data_before)
                entry["other"].append(other_after - other_before)
        import torch
        from safetensors.torch import load_file

        a = load_file(os.path.join(work, "out-local.safetensors"))
        b = load_file(os.path.join(work, "out-streamed.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), "streamed average differs from the local one"

        print(
            f"{args.members} checkpoints of {total / args.members / 1e6:.1f} MB ({total:,} bytes in all), "
            f"median of {args.repeat}"
        )
        print(
            f"{'method':<10} {'seconds':>8} {'object bytes read':>18} {'x checkpoints':>14} {'other bytes':>12}"
        )
        for name, entry in results.items():
            seconds = statistics.median(entry["seconds"])
            sent = statistics.median(entry["bytes"])
            other = statistics.median(entry["other"])
            print(f"{name:<10} {seconds:>8.2f} {int(sent):>18,} {sent / total:>14.4f} {int(other):>12,}")
        streamed = statistics.median(results["streamed"]["bytes"])
        print(
            f"target streamed bytes <= checkpoints' size: {'met' if streamed <= total else 'NOT met'} "
            f"({streamed / total:.3f}x)"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
