"""Start the service: load and warm the models, recover the job store, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional

from .. import PixArtSigmaModel, SettingsError

log = logging.getLogger(__name__)
HOME_ENV = "PIXART_SIGMA_HOME"
API_KEY_ENV = "PIXART_SIGMA_API_KEY"
MAX_QUEUE_SIZE = 10_000


def default_data_dir() -> Path:
    """PIXART_SIGMA_HOME, else the platform's user data folder."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pixart-sigma"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "pixart-sigma"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "pixart-sigma"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_models(model_names: list[str], device: str, dtype: str, memory: str = "auto") -> dict[str, PixArtSigmaModel]:
    """Each served model, loaded and warmed by one small generation (kernels chosen, caches filled)."""
    models = {}
    for name in model_names:
        model = PixArtSigmaModel(model_name=name, device=device, dtype=dtype, memory=memory)
        model.generate("warm-up", num_inference_steps=1, width=64, height=64, num_images_per_prompt=1, seed=0)
        models[name] = model
    return models


def check_models_fit(models: dict[str, PixArtSigmaModel]) -> None:
    """Every served model must stay warm: past the cache budget each job would evict and reload another."""
    from ..engine import MEMORY_BUDGET_ENV, cached_engines

    warm = {id(engine) for engine in cached_engines()}
    if any(id(model.engine) not in warm for model in models.values()):
        # `model.engine` above reloaded the evicted one; say what to change instead of thrashing.
        raise SettingsError([f"the {len(models)} served models do not fit the warm-model budget together: "
                             f"serve fewer, or raise {MEMORY_BUDGET_ENV}"])


def serve(model_names: list[str], device: str = "auto", dtype: str = "auto", memory: str = "auto",
          host: str = "127.0.0.1", port: int = 8000, data_dir: Optional[Path] = None, queue_size: int = 8,
          api_key: Optional[str] = None, log_level: str = "info", keep_jobs: int = 0) -> int:
    import uvicorn

    from .app import asgi, create_app
    from .service import Service
    from .store import JobStore

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
    if problems:
        raise SettingsError(problems)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    names = list(dict.fromkeys(model_names)) or [PixArtSigmaModel.get_schema()["properties"]["model_name"]["default"]]
    store = JobStore(data_dir)
    print(f"loading {', '.join(names)} ...", file=sys.stderr, flush=True)
    models = load_models(names, device, dtype, memory)
    check_models_fit(models)
    service = Service(models, store, queue_size, keep_jobs)
    app = create_app(service, api_key, loopback=is_loopback(host))
    server = _DrainingServer(uvicorn.Config(asgi(app), host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=5), service)
    service.start()
    print(f"pixart-sigma serving {', '.join(names)} on http://{host}:{port}/ (data in {data_dir})",
          file=sys.stderr, flush=True)
    server.run()
    service.drain()
    service.wait_stopped(timeout=600)
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

    def run(self) -> None:
        self.server.run()
