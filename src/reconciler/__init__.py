"""reconciler: a GitOps-style declarative reconciler for a small private cloud."""

__version__ = "0.1.0"
API_VERSION = "reconciler/v1"
