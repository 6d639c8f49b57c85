"""loraplex: a registry of LoRA adapters for a base transformer, composed at run time by
mixture-of-experts routers or written by generators, with a Lightning continual trainer.

The public API is `loraplex.api`; the command line is `loraplex` (`loraplex.cli`)."""

__version__ = "0.1.0"
