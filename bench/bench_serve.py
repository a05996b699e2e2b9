"""Load check of `boneage serve` on loopback: N concurrent clients x M requests each to POST /api/v1/predict.

Usage (from the repository root):
    python bench/bench_serve.py [--clients 8] [--requests 200] [--image FILE] [--backend torch|onnx --model M]
                                [--max-pending 8]

Starts the server in a subprocess (shipped model unless --model), sends a real radiograph (the first full-resolution
sample in ../shared/data when present, else a synthetic one), and prints status counts, throughput and p50/p95/p99
latency as JSON, and how long GET /api/v1/health took meanwhile (polled every 0.2 s). Readings beyond the server's
--max-pending get 503 with Retry-After (counted, not retried); any other status, and any 5xx but 503, is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import FULLRES, synthetic_radiograph  # also puts the repository root on the path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_bytes(path: str | None) -> tuple[bytes, str]:
    if path:
        return Path(path).read_bytes(), Path(path).name
    samples = sorted((FULLRES / "images").glob("*.png"))
    if samples:
        return samples[0].read_bytes(), f"{samples[0].name} (full-resolution sample)"
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic_radiograph(120, size=512)).save(buffer, format="PNG")
    return buffer.getvalue(), "synthetic 512 px"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--image")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--model")
    parser.add_argument("--max-pending", type=int, default=8, help="the server's --max-pending (0: not passed)")
    args = parser.parse_args()

    import httpx

    data, name = _image_bytes(args.image)
    port = _free_port()
    command = [sys.executable, "-m", "boneage", "serve", "--port", str(port), "--backend", args.backend]
    command += ["--model", args.model] if args.model else []
    command += ["--max-pending", str(args.max_pending)] if args.max_pending else []  # 0: a server without the option
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start")

        def client(_: int) -> list[tuple[int, float]]:
            results = []
            with httpx.Client(base_url=url, timeout=120) as session:
                for _ in range(args.requests):
                    start = time.perf_counter()
                    try:
                        status = session.post(
                            "/api/v1/predict",
                            files={"file": ("upload.png", data, "image/png")},
                            data={"sex": "F", "chronological_age_months": "120"},
                        ).status_code
                    except httpx.TransportError:
                        status = 0  # connection failure
                    results.append((status, time.perf_counter() - start))
            return results

        health: list[float] = []
        done = threading.Event()

        def probe() -> None:  # the liveness check a load balancer or monitor sends, during the load
            with httpx.Client(base_url=url, timeout=60) as session:
                while not done.wait(0.2):
                    start = time.perf_counter()
                    session.get("/api/v1/health")
                    health.append(time.perf_counter() - start)

        prober = threading.Thread(target=probe)
        prober.start()
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(args.clients) as pool:
                results = [r for batch in pool.map(client, range(args.clients)) for r in batch]
        finally:
            done.set()
            prober.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = sorted(1000 * seconds for _, seconds in results)
    statuses = Counter(status for status, _ in results)
    report = {
        "image": name,
        "image_bytes": len(data),
        "backend": args.backend,
        "clients": args.clients,
        "requests": len(results),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_5xx_other_than_503": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "max_pending": args.max_pending,
        "health_checks": len(health),
        "health_ms_p50": round(1000 * statistics.median(health), 1) if health else None,
        "health_ms_max": round(1000 * max(health), 1) if health else None,
        "throughput_per_s": round(len(results) / wall, 2),
        "latency_ms_p50": round(statistics.median(latencies), 1),
        "latency_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "latency_ms_p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
