"""Settings: where the registry lives, which device and dtype to compute in, which embedder to use.

Values come from keyword arguments first, then environment variables, then defaults:

| field     | environment          | default                                              |
|-----------|----------------------|------------------------------------------------------|
| home      | LORAPLEX_HOME        | ~/.loraplex                                          |
| device    | LORAPLEX_DEVICE      | auto: cuda when torch sees a GPU, else cpu           |
| dtype     | LORAPLEX_DTYPE       | auto: bfloat16 on cuda (when supported), else float32 |
| embedder  | LORAPLEX_EMBEDDER    | minilm                                               |
| cache_dir | LORAPLEX_CACHE       | $XDG_CACHE_HOME/loraplex or ~/.cache/loraplex        |

Resolving "auto" needs torch, so it happens lazily in `resolved_device()` / `torch_dtype()`, keeping
this module cheap to import from the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def _default_home() -> Path:
    return Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".loraplex")


def _default_cache() -> Path:
    if os.environ.get("LORAPLEX_CACHE"):
        return Path(os.environ["LORAPLEX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "loraplex" if xdg else Path.home() / ".cache" / "loraplex"


class Settings(BaseModel):
    """Process-wide settings; build with `Settings.load(...)` so the environment is honoured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Field(default_factory=_default_home)
    """Directory of the registry (SQLite database, blobs, index, runs)."""
    device: DeviceName = "auto"
    """Device to compute on: auto, cpu, cuda or mps."""
    dtype: DtypeName = "auto"
    """Compute dtype of the base model: auto, float32, bfloat16 or float16."""
    embedder: str = "minilm"
    """Embedder for task descriptions and signatures (a name in loraplex.embedders.EMBEDDERS)."""
    cache_dir: Path = Field(default_factory=_default_cache)
    """Cache for converted models (the GGUF SmolLM2 saved once as safetensors)."""

    @field_validator("home", "cache_dir", mode="before")
    @classmethod
    def _expand(cls, v: object) -> object:
        """`~` and `~user` expanded, made absolute; an empty path (it would mean the current directory) and a
        `~user` of no such user are refused."""
        if not isinstance(v, (str, Path)):
            return v
        if not str(v).strip():
            raise ValueError("an empty path (name a directory)")
        try:
            return Path(v).expanduser().absolute()
        except RuntimeError:  # pathlib: "Could not determine home directory."
            raise ValueError(f"cannot expand {str(v).split('/')[0]!r}: no such user's home directory") from None

    @property
    def embedder_named_by(self) -> str | None:
        """How the caller named the embedder, for messages: "LORAPLEX_EMBEDDER" or "embedder" (a keyword);
        None when it is the default. A registry whose signatures were made with another embedder refuses
        a named one (`Registry.embedder_name`)."""
        if "embedder" not in self.model_fields_set:
            return None
        return "LORAPLEX_EMBEDDER" if os.environ.get("LORAPLEX_EMBEDDER") == self.embedder else "embedder"

    @classmethod
    def load(cls, **overrides: object) -> "Settings":
        """Settings from the environment, with explicit keyword overrides (None means "not given")."""
        env = {
            "home": os.environ.get("LORAPLEX_HOME"),
            "device": os.environ.get("LORAPLEX_DEVICE"),
            "dtype": os.environ.get("LORAPLEX_DTYPE"),
            "embedder": os.environ.get("LORAPLEX_EMBEDDER"),
            "cache_dir": os.environ.get("LORAPLEX_CACHE"),
        }
        values = {k: v for k, v in env.items() if v}
        values.update({k: v for k, v in overrides.items() if v is not None})
        from pydantic import ValidationError

        from loraplex.errors import InvalidSpec

        try:
            return cls(**values)
        except ValidationError as e:  # one line naming the setting, where it came from, and what it allows
            err = e.errors()[0]
            key = str(err["loc"][0]) if err.get("loc") else "settings"
            src = f"LORAPLEX_{key.upper()}" if key in env and overrides.get(key) is None else key
            given = values.get(key)
            given = str(given) if isinstance(given, Path) else given
            raise InvalidSpec(f"{src}={given!r}: {err['msg'].removeprefix('Value error, ')}") from None

    def resolved_device(self) -> str:
        if self.device != "auto":
            import torch

            from loraplex.errors import InvalidSpec

            if self.device == "cuda" and not torch.cuda.is_available():
                raise InvalidSpec("device 'cuda' was asked for (LORAPLEX_DEVICE, or Settings(device=...)), but torch sees no CUDA GPU here")
            if self.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise InvalidSpec("device 'mps' was asked for (LORAPLEX_DEVICE, or Settings(device=...)), but MPS is not available here")
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self):  # -> torch.dtype
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.resolved_device() == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32


def available_devices(accelerator: str = "auto") -> tuple[int, str]:
    """(how many devices of this kind the machine has, their kind): GPUs for gpu/cuda (and for auto when
    torch sees one), else CPU cores (Lightning starts one process per CPU device)."""
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda", "auto"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if acc != "auto" or n:
            return n, "GPU"
    if acc == "mps":
        return 1, "MPS device"
    return os.cpu_count() or 1, "CPU core"


def with_checked_devices(config):
    """A frozen training config (`accelerator`, `devices`) with its `devices` checked and normalised by
    `check_devices`; the model validator of every config that starts Lightning."""
    try:
        object.__setattr__(config, "devices", check_devices(config.devices, config.accelerator))
    except ValueError as exc:
        raise ValueError(f"devices: {exc}") from None
    return config


def check_devices(devices: object, accelerator: str = "auto") -> int | str:
    """Lightning's `devices` as loraplex accepts it: 'auto', -1 (all), or 1..N where N is what the machine
    has (checked before anything starts, so `--devices 99` never spawns 98 worker processes)."""
    if isinstance(devices, str):
        v = devices.strip().lower()
        if v == "auto":
            return "auto"
        try:
            devices = int(v)
        except ValueError:
            raise ValueError(f"must be a number or 'auto', got {devices!r}") from None
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise ValueError(f"must be a number or 'auto', got {devices!r}")
    have, kind = available_devices(accelerator)
    if devices == -1:  # Lightning's "every GPU": its CPU accelerator refuses it (a process per core is no default)
        if kind != "GPU" or have < 1:
            raise ValueError("-1 asks for every GPU, and this machine has none: give a number (on CPU, of processes)")
        return have
    if devices < 1:
        raise ValueError(f"must be at least 1 (or 'auto', or -1 for all), got {devices}")
    if devices > have:
        raise ValueError(f"{devices} devices asked for, but this machine has {have} {kind}{'s' if have != 1 else ''}")
    return devices
