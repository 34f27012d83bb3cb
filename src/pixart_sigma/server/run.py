"""Start the service: bind the port, check the job store, load and warm the models, then start the job
worker and serve with uvicorn; drain on SIGTERM.

The order matters: nothing is taken from the queue until the port is bound and the store has passed its
check, so a start that fails (a port in use, a damaged store) leaves every queued job as it was.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from .. import MEMORY_BUDGET_ENV, PixArtSigmaError, PixArtSigmaModel, SettingsError
from ..home import default_data_dir, default_lora_dir
from . import API_KEY_ENV, KEEP_GRACE_SECONDS, MAX_QUEUE_SIZE, is_loopback

log = logging.getLogger(__name__)
def load_models(model_names: list[str], device: str, dtype: str, memory: str = "auto",
                text_encoder_dtype: str = "auto", lora_dir: Optional[Path] = None) -> dict[str, PixArtSigmaModel]:
    """Each served model, loaded and warmed by one small generation (kernels chosen, caches filled)."""
    models = {}
    for name in model_names:
        # A client names LoRAs of the served folder only, never a path on this machine.
        model = PixArtSigmaModel(model_name=name, device=device, dtype=dtype, text_encoder_dtype=text_encoder_dtype,
                                 memory=memory, lora_dir=lora_dir, lora_paths=False)
        model.generate("warm-up", num_inference_steps=1, width=64, height=64, num_images_per_prompt=1, seed=0)
        models[name] = model
    return models


def check_models_fit(models: dict[str, PixArtSigmaModel]) -> None:
    """Every served model must stay warm: past the cache budget each job would evict and reload another."""
    cold = [model for model in models.values() if not model.is_warm]
    if cold:
        budget = cold[0].warm_budget_bytes
        raise SettingsError([f"the {len(models)} served models do not fit the warm-model budget together "
                             f"({budget / 2**30:.1f} GiB on {cold[0].settings['device']}): serve fewer, or raise "
                             f"{MEMORY_BUDGET_ENV}"])


class StartError(PixArtSigmaError):
    """The service cannot start here (its port); nothing was taken from the queue."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before anything else starts; StartError naming the port when it is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartError(f"host={host!r} cannot be served: {exc.strerror}; give an address of this machine, "
                         "e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # as uvicorn does: a restart may bind while old connections linger
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "another program is serving there; choose another --port, or --port 0 for a free one",
               errno.EACCES: "ports below 1024 need privileges; choose a port from 1024, or --port 0 for a free one",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; give one of its own, e.g. 127.0.0.1"}
        raise StartError(f"port={port} on {host} cannot be used ({exc.strerror or exc}): "
                         f"{why.get(exc.errno, 'choose another --port or --host')}") from None
    return sock


def listen(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.listen(2048)
    except OSError as exc:  # bound minutes ago, while the models loaded; another program may have taken it since
        raise StartError(f"port={port} on {host} cannot be used ({exc.strerror or exc}): choose another --port, "
                         "or --port 0 for a free one") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(model_names: list[str], device: str = "auto", dtype: str = "auto", memory: str = "auto",
          text_encoder_dtype: str = "auto",
          host: str = "127.0.0.1", port: int = 8000, data_dir: Optional[Path] = None, queue_size: int = 8,
          api_key: Optional[str] = None, log_level: str = "info", keep_jobs: int = 0,
          keep_grace_seconds: Optional[float] = None, allow_compile: bool = False,
          lora_dir: Optional[Path] = None) -> int:
    import uvicorn

    from .app import asgi, create_app
    from .guards import host_names
    from .service import Service
    from .store import ORPHAN_FOLDER, ORPHAN_UPLOAD_FOLDER, JobStore

    keep_grace_seconds = KEEP_GRACE_SECONDS if keep_grace_seconds is None else keep_grace_seconds

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        raise SettingsError([f"host={host!r} is reachable from other machines: set an API key with --api-key or "
                             f"{API_KEY_ENV} (or bind 127.0.0.1)"])
    problems = []
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        problems.append(f"queue_size={queue_size} is not valid: from 1 to {MAX_QUEUE_SIZE}")
    if not 0 <= port <= 65535:
        problems.append(f"port={port} is not valid: from 1 to 65535 (0 picks a free one)")
    if keep_jobs < 0:
        problems.append(f"keep_jobs={keep_jobs} is not valid: 0 keeps every job, N keeps the newest N finished ones")
    if not 0 <= keep_grace_seconds <= 86_400 * 365:
        problems.append(f"keep_grace={keep_grace_seconds:g} is not valid: seconds from 0 to a year")
    if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
        problems.append(f"lora_dir={str(lora_dir)!r} is not a folder: give the folder that holds the LoRAs requests "
                        f"may name (.safetensors files, PEFT folders), or leave --lora-dir out for {default_lora_dir()}")
    if problems:
        raise SettingsError(problems)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else default_lora_dir()
    names = list(dict.fromkeys(model_names)) or [PixArtSigmaModel.get_schema()["properties"]["model_name"]["default"]]
    sock = bind(host, port)
    store = None
    try:
        store = JobStore(data_dir)
        moved, removed = store.reconcile()
        if moved or removed:
            print(f"images and uploads folders checked against the job store: {moved} file(s) that no job lists "
                  f"moved to {data_dir / ORPHAN_FOLDER} or {data_dir / ORPHAN_UPLOAD_FOLDER}, {removed} partial "
                  "file(s) or link(s) removed",
                  file=sys.stderr, flush=True)
        print(f"loading {', '.join(names)} ...", file=sys.stderr, flush=True)
        models = load_models(names, device, dtype, memory, text_encoder_dtype, lora_dir)
        check_models_fit(models)
        service = Service(models, store, queue_size, keep_jobs, keep_grace_seconds, allow_compile, lora_dir)
        found = len(service.loras.files())
        print(f"LoRAs: {found} in {lora_dir}" if found or lora_dir.is_dir() else
              f"LoRAs: none ({lora_dir} does not exist; --lora-dir names another folder)", file=sys.stderr, flush=True)
        app = create_app(service, api_key, hosts=host_names(host) if is_loopback(host) and not api_key else None)
        server = _DrainingServer(uvicorn.Config(asgi(app), log_level=log_level, timeout_graceful_shutdown=5), service)
        listen(sock, host, port)
        service.start()
        print(f"pixart-sigma serving {', '.join(names)} on {url_of(sock)} (data in {data_dir})",
              file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            service.drain()
            service.wait_stopped(timeout=600)
    finally:
        sock.close()
        if store is not None:
            store.close()
    return 0


class _DrainingServer:
    """uvicorn's server, but the first SIGTERM/SIGINT drains: /readyz turns 503 and new jobs are refused at
    once, the running job finishes, then uvicorn stops. A second signal stops at once."""

    def __init__(self, config, service):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer._signal(self, sig, frame)

        self.server = Server(config)
        self.service = service
        self._draining = False

    def _signal(self, server, sig, frame) -> None:
        import uvicorn

        if self._draining:
            uvicorn.Server.handle_exit(server, sig, frame)
            return
        self._draining = True
        self.service.drain()

        def stop_when_idle():
            self.service.wait_stopped()
            server.should_exit = True

        threading.Thread(target=stop_when_idle, name="pixart-sigma-drain", daemon=True).start()

    def run(self, sockets: list) -> None:
        self.server.run(sockets=sockets)
