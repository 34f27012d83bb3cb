"""The service's overhead: a demo job through HTTP beside the same generation through the library.

Starts its own `pixart-sigma serve --model-name demo` on 127.0.0.1 and a free port (tests/serving.py's
helper), then measures, in one run:

- per job, median of N: POST /v1/generations, follow its server-sent events to `done`, GET the PNG;
  against `PixArtSigmaModel(model_name="demo").generate(...)` in this process, same settings;
  the ratio and the absolute overhead (target: under 10% of a job or under 30 ms, whichever is larger);
- jobs per second with 8 concurrent clients (each submits, follows the events, fetches the image);
- the resident memory (VmRSS) of the idle server process, before and after the load;
- the queue's cost with 10 and with 5,000 jobs waiting (a fresh server each, its worker held by a slow
  job): submit latency (median and 99th percentile of the last 100 submissions), the server's memory
  after the submissions and after 100 jobs have started from the full queue, and how fast those ran.

    python benchmarks/service_benchmark.py                 # 20 steps, N=10, 32 jobs, queues of 10 and 5000
    python benchmarks/service_benchmark.py --queue-only    # only the queue's cost
    python benchmarks/service_benchmark.py --json out.json # also write the numbers as JSON

All traffic goes to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from pixart_sigma.server.service import Service  # noqa: E402
from pixart_sigma.server.store import JobStore  # noqa: E402
from serving import start_server  # noqa: E402

PROMPT = "a red circle on a blue background"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def local_job(service, body: dict, timeout: float = 120) -> float:
    """Seconds from submitting to the service in this process to its `done` event (no HTTP)."""
    started = time.perf_counter()
    job, _ = service.submit(body)
    deadline = time.monotonic() + timeout
    progress = service.progress(job.id)
    while not (progress.events and progress.events[-1]["event"] == "done"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"local job {job.id} not done in {timeout} s")
        time.sleep(0.001)
    return time.perf_counter() - started


def http_job(client: httpx.Client, body: dict, timeout: float = 120) -> tuple[float, dict]:
    """Seconds from POST to the PNG in hand, following the job's events; and the finished job."""
    started = time.perf_counter()
    response = client.post("/v1/generations", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    done = None
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as events:
        name = None
        for line in events.iter_lines():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done in {timeout} s")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "done":
                done = json.loads(line[6:])
                break
    if done is None or done["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended as {done}")
    for image in done["images"]:
        png = client.get(image["url"])
        png.raise_for_status()
        assert png.content.startswith(b"\x89PNG")
    return time.perf_counter() - started, done


def queue_cost(waiting: int, starts: int) -> dict:
    """A fresh server with `waiting` jobs queued behind a slow one: submit latency, memory, start rate."""
    data = Path(tempfile.mkdtemp(prefix="pixart-queue-bench-")) / "data"
    server = start_server(data, "--model-name", "demo", "--queue-size", str(waiting + 1), faults=True,
                          env={"PYTHONWARNINGS": "ignore"})
    try:
        pid = server.process.pid
        with httpx.Client(base_url=server.url, timeout=60) as client:
            holder = client.post("/v1/generations", json={"prompt": "[slow] hold", "num_inference_steps": 200}).json()
            time.sleep(1.0)
            rss_before = rss_mib(pid)
            latencies = []
            for k in range(waiting):
                started = time.perf_counter()
                response = client.post("/v1/generations", json={"prompt": PROMPT, "seed": k, "num_inference_steps": 1})
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
            rss_queued = rss_mib(pid)
            started = time.perf_counter()
            client.delete(f"/v1/jobs/{holder['id']}")
            ran = 0
            while ran < starts:  # the first queued jobs run, each start from a (nearly) full queue
                counts = {line.split('"')[1]: float(line.split()[-1]) for line in client.get("/metrics").text.splitlines()
                          if line.startswith("pixart_jobs{")}
                ran = int(counts.get("succeeded", 0))
                time.sleep(0.01)
            starts_s = time.perf_counter() - started
            time.sleep(0.5)
            rss_started = rss_mib(pid)
    finally:
        server.stop(timeout=120)
    tail = sorted(latencies[-100:])
    return {"waiting": waiting, "submit_median_ms": statistics.median(tail) * 1000,
            "submit_p99_ms": tail[min(len(tail) - 1, int(0.99 * len(tail)))] * 1000,
            "rss_before_mib": rss_before, "rss_queued_mib": rss_queued, "rss_after_starts_mib": rss_started,
            "starts": starts, "starts_s": starts_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per job (default 20)")
    parser.add_argument("--repeats", type=int, default=10, help="N: jobs timed each way, median taken (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput (default 8)")
    parser.add_argument("--load-jobs", type=int, default=32, help="jobs in the throughput run (default 32)")
    parser.add_argument("--queued", default="10,5000", help="queue lengths to measure, comma-separated (default 10,5000)")
    parser.add_argument("--starts", type=int, default=100, help="jobs run from the full queue (default 100)")
    parser.add_argument("--queue-only", action="store_true", help="measure only the queue's cost")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    queues = []
    for waiting in [int(part) for part in args.queued.split(",") if part.strip()]:
        print(f"queue cost with {waiting} jobs waiting ...", file=sys.stderr, flush=True)
        queues.append(queue_cost(waiting, min(args.starts, waiting)))
    queue_rows = [(f"{q['waiting']} queued: submit latency, median / p99 of the last 100",
                   f"{q['submit_median_ms']:.1f} / {q['submit_p99_ms']:.1f} ms") for q in queues]
    queue_rows += [(f"{q['waiting']} queued: server RSS idle / queued / after {q['starts']} starts",
                    f"{q['rss_before_mib']:.0f} / {q['rss_queued_mib']:.0f} / {q['rss_after_starts_mib']:.0f} MiB")
                   for q in queues]
    queue_rows += [(f"{q['waiting']} queued: the first {q['starts']} jobs (1 step each), per job",
                    f"{q['starts_s'] / q['starts'] * 1000:.1f} ms") for q in queues]
    if args.queue_only:
        print("\nService benchmark: the queue's cost\n\n| measure | value |\n|---|---|")
        for name, value in queue_rows:
            print(f"| {name} | {value} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"queues": queues}, indent=2))
        return 0

    from pixart_sigma import PixArtSigmaModel

    data = Path(tempfile.mkdtemp(prefix="pixart-service-bench-")) / "data"
    print("starting the server ...", file=sys.stderr, flush=True)
    server = start_server(data, "--model-name", "demo", "--queue-size", str(max(64, args.load_jobs + 8)),
                          env={"PYTHONWARNINGS": "ignore"})
    try:
        pid = server.process.pid
        time.sleep(1.0)
        rss_idle = rss_mib(pid)
        model = PixArtSigmaModel(model_name="demo")
        body = lambda seed: {"prompt": PROMPT, "seed": seed, "num_inference_steps": args.steps}  # noqa: E731
        with httpx.Client(base_url=server.url, timeout=120) as client:
            # Warm both sides (first calls fill caches), then alternate, so load elsewhere hits both alike.
            model.generate(PROMPT, seed=0, num_inference_steps=args.steps)
            http_job(client, body(0))
            # The same queue and worker in this process, without HTTP: what the service's own machinery costs.
            local = Service({"demo": model}, JobStore(Path(tempfile.mkdtemp(prefix="pixart-sigma-bench-"))))
            local.start()
            library_times, http_times, server_run_times, local_times = [], [], [], []
            for k in range(args.repeats):
                started = time.perf_counter()
                model.generate(PROMPT, seed=k + 1, num_inference_steps=args.steps)
                library_times.append(time.perf_counter() - started)
                seconds, done = http_job(client, body(k + 1))
                http_times.append(seconds)
                server_run_times.append(done["finished"] - done["started"])
                local_times.append(local_job(local, body(k + 1)))
            local.drain()

        print(f"throughput: {args.load_jobs} jobs, {args.clients} clients ...", file=sys.stderr, flush=True)
        counter = iter(range(args.load_jobs))
        lock = threading.Lock()
        errors: list[BaseException] = []
        job_seconds: list[float] = []

        def worker() -> None:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                while True:
                    with lock:
                        k = next(counter, None)
                    if k is None:
                        return
                    try:
                        seconds, _ = http_job(client, body(1000 + k), timeout=300)
                        job_seconds.append(seconds)
                    except BaseException as exc:  # reported below
                        errors.append(exc)
                        return

        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} throughput jobs failed: {errors[0]!r}")
        time.sleep(1.0)
        rss_after = rss_mib(pid)
    finally:
        server.stop()

    library_ms = statistics.median(library_times) * 1000
    http_ms = statistics.median(http_times) * 1000
    server_run_ms = statistics.median(server_run_times) * 1000
    local_ms = statistics.median(local_times) * 1000
    overhead_ms = http_ms - library_ms
    target_ms = max(0.10 * library_ms, 30.0)
    results = {
        "steps": args.steps, "repeats": args.repeats, "library_ms": library_ms, "http_ms": http_ms,
        "ratio": http_ms / library_ms, "overhead_ms": overhead_ms, "target_ms": target_ms,
        "meets_target": overhead_ms <= target_ms, "clients": args.clients, "load_jobs": args.load_jobs,
        "jobs_per_second": args.load_jobs / wall, "library_jobs_per_second": 1000 / library_ms,
        "load_job_median_ms": statistics.median(job_seconds) * 1000,
        "rss_idle_mib": rss_idle, "rss_idle_after_load_mib": rss_after, "cpus": os.cpu_count(),
        "server_run_ms": server_run_ms, "local_service_ms": local_ms,
        "library_all_ms": [t * 1000 for t in library_times], "http_all_ms": [t * 1000 for t in http_times],
    }
    rows = [
        ("demo job, library `generate` (median)", f"{library_ms:.1f} ms"),
        ("demo job through HTTP: POST + SSE to done + GET PNG (median)", f"{http_ms:.1f} ms"),
        ("  of which the job's run in the server process (started to finished)", f"{server_run_ms:.1f} ms"),
        ("  so HTTP, queue and store around the run (POST to start, finish to PNG in hand)",
         f"{http_ms - server_run_ms:.1f} ms"),
        ("the same queue and worker in this process, no HTTP (submit to done)", f"{local_ms:.1f} ms"),
        ("ratio HTTP / library", f"{results['ratio']:.3f}"),
        ("overhead (HTTP - library)", f"{overhead_ms:+.1f} ms"),
        ("target: max(10% of a job, 30 ms)", f"{target_ms:.1f} ms -> {'met' if results['meets_target'] else 'NOT met'}"),
        (f"throughput, {args.clients} concurrent clients, {args.load_jobs} jobs", f"{results['jobs_per_second']:.2f} jobs/s"),
        ("library alone, one after another", f"{results['library_jobs_per_second']:.2f} jobs/s"),
        ("a job's latency under that load (median)", f"{results['load_job_median_ms']:.0f} ms"),
        ("server RSS, idle after start", f"{rss_idle:.0f} MiB"),
        ("server RSS, idle after the load", f"{rss_after:.0f} MiB"),
        *queue_rows,
    ]
    results["queues"] = queues
    print(f"\nService benchmark: demo model, {args.steps} steps, 64x64, N={args.repeats}, {os.cpu_count()} CPUs\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
