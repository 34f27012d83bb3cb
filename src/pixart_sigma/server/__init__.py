"""The HTTP service (`pixart-sigma serve`): a job queue over the public library, with a web page.

An optional extra (`pip install "pixart-sigma[server]"`): the core library never imports it.
"""
