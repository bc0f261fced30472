"""preforkd: a preforking application server for WSGI apps and TCP handlers."""

__version__ = "0.1.0"
