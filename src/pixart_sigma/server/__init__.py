"""The HTTP service (`pixart-sigma serve`): a job queue over the public library, with a web page.

An optional extra (`pip install "pixart-sigma[server]"`): the core library never imports it.
"""

import ipaddress

# Facts every front end that serves HTTP shares (the service, the Ray Serve gateway); light to import.
API_KEY_ENV = "PIXART_SIGMA_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether an address to bind is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

