"""Real server processes for the service tests: `pixart-sigma serve` on 127.0.0.1 and a free port.

`start_server(data_dir, *flags)` starts one and waits for /readyz (sending `api_key` when the server has one); with `faults=True` the process runs
through tests/fault_server.py, which makes prompts containing [oom] raise an out-of-memory error at
step 1 and prompts containing [slow] take 0.2 s a step (the service code itself is unchanged).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    data_dir: Path
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(data_dir: Path, *flags: str, faults: bool = False, env: dict | None = None,
                 timeout: float = 120, wait_ready: bool = True, api_key: str | None = None) -> Server:
    port = free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"server-{port}.log"
    entry = [str(HERE / "fault_server.py")] if faults else ["-m", "pixart_sigma"]
    command = [sys.executable, *entry, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
               str(data_dir), *(flags or ("--model-name", "demo")), *(("--api-key", api_key) if api_key else ())]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=full_env)
    server = Server(process, f"http://127.0.0.1:{port}", data_dir, log)
    if not wait_ready:
        return server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.output()[-3000:]}")
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            if httpx.get(server.url + "/readyz", timeout=2, headers=headers).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"the server was not ready in {timeout} s:\n{server.output()[-3000:]}")


def wait_until(predicate, timeout: float, interval: float = 0.05):
    """The first true value of `predicate()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met in {timeout} s")


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def demo_transformer_config() -> dict:
    """The demo model's transformer config, read from its files (no weights loaded)."""
    from pixart_sigma.checkpoints import locate, part_config, resolve_checkpoint

    return part_config(locate(resolve_checkpoint("demo"), local_only=True).folders["transformer"], "transformer")


def write_demo_lora(path: Path, seed: int, layout: str = "kohya", size: float = 0.3,
                    metadata: dict | None = None) -> Path:
    """A LoRA for the demo transformer with random weights (no training), big enough to change its pixels: on
    the attention and feed-forward of every block, as tests/test_loras.py makes them."""
    import torch

    from pixart_sigma.lora_formats import Lora, LoraWeights, transformer_targets, write_lora

    targets = transformer_targets(demo_transformer_config())
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, target in targets.items():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_q", "ff.net.2")):
            down = torch.randn(4, target.in_features, generator=generator) * size
            weights[name] = LoraWeights(down, torch.randn(target.out_features, 4, generator=generator) * size, 8.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora(path, Lora(weights), layout, metadata=metadata)
