"""`ContinualModule`, the LightningModule that trains adapters, lives in `loraplex.training` (router
fitting trains with it too, and `router/` may not import `continual/`); this name stays for imports."""

from loraplex.training import ContinualModule  # noqa: F401
