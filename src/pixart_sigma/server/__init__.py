"""The HTTP service (`pixart-sigma serve`): a job queue over the public library, with a web page.

An optional extra (`pip install "pixart-sigma[server]"`): the core library never imports it.
"""

import ipaddress

# Facts every front end that serves HTTP shares (the service, the Ray Serve gateway, the CLI's flags);
# light to import: the web stack loads only when serving.
API_KEY_ENV = "PIXART_SIGMA_API_KEY"
MAX_QUEUE_SIZE = 10_000
KEEP_GRACE_SECONDS = 600  # retention keeps a job this long after its end or its URLs going out


def serve(*args, **kwargs) -> int:
    """`pixart-sigma serve`: see run.serve."""
    from .run import serve as run

    return run(*args, **kwargs)


def is_loopback(host: str) -> bool:
    """Whether an address to bind is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

