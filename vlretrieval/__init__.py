"""vlretrieval: cross-modal image-text retrieval in JAX/Flax."""

from vlretrieval import log as _log  # noqa: F401  (installs the console handler; see log.py)

__version__ = "0.1.0"
