"""File I/O shared by every part: atomic writes (a reader, or a crash at any moment, sees the old content
or the new, never a mix), bounded reads of user files (`read_bounded_bytes`, `read_bounded_text`), JSON
and YAML readers that refuse duplicate keys (`unique_keys`, `read_json_file`, `read_yaml_file`), and
`uninterrupted()` (Ctrl-C held until a short write, such as a report's, has ended)."""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def user_path(path: str | Path) -> Path:
    """`path` with a leading `~` or `~user` expanded, as every path loraplex reads or writes is; a `~user`
    naming no user of this machine is refused by name (pathlib raised RuntimeError: an internal error), and so is
    an empty one (Path("") is the working directory: `register("")` registered whatever folder it was run in) and
    one holding a NUL byte."""
    if isinstance(path, str) and not path.strip():
        from loraplex.errors import UserInputError

        raise UserInputError("a path is empty: name a file or directory")
    if "\x00" in str(path):  # the OS's ValueError ("embedded null byte") was an internal error, and some messages
        from loraplex.errors import UserInputError  # named the path with the NUL dropped (sweep 69)

        raise UserInputError(f"path {str(path)[:120]!r} holds a NUL byte: no file can be named so")
    try:
        return Path(path).expanduser()
    except RuntimeError:
        from loraplex.errors import UserInputError

        head = str(path).split(os.sep, 1)[0]
        raise UserInputError(f"path {str(path)!r}: {head!r} names no user of this machine") from None


def without_dotdot(path: str | Path) -> Path:
    """An absolute `path` with no `..` in it that opens the same file: its folder resolved as the system does
    (a `..` after a symbolic link goes up from the link's target: sweep 52), the file's own name kept (a link to
    a task file stays that link). A path with no `..` is returned as it is."""
    p = Path(path).absolute()
    if ".." not in p.parts:
        return p
    return Path(os.path.realpath(p.parent)) / p.name


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory `path` durable (fsync the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: /proc/self/status; elsewhere the
    set-and-restore that is the only portable way, not safe against a thread creating a file meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, *, prefix: str | None = None, suffix: str = "",
                sync_dir: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write; on leaving the block it is fsynced and renamed over `path` (on an error
    the temporary file is removed and `path` is untouched); `sync_dir` also makes the rename durable.
    The file gets the mode a plain open() would give it (0666 less the umask), not the temporary file's
    0600: a registry's blobs and caches must stay readable by whoever may read the rest of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # write() and fsync() name no file: a full disk was told without its path
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def missing_dirs(path: str | Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would make (`path` and its missing parents), deepest first:
    what `remove_if_empty` takes away again when the command that made them fails."""
    path = Path(path)
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_if_empty(dirs: list[Path]) -> None:
    """Remove `dirs` (deepest first) while they are empty: another command may have written there since."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically (an OSError names `path`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically: serialised in memory, then `atomic_write`, so a full disk is
    an OSError naming `path` (safetensors' own save_file raised its SafetensorError: an internal error)."""
    from safetensors.torch import save

    atomic_write(path, save(tensors, metadata=metadata))


MAX_SPEC_BYTES = 1 << 20
"""Default size bound for the small JSON/YAML files loraplex reads (configs, specs, task sidecars)."""


def read_bounded_bytes(path: str | Path, *, error: type[Exception], max_bytes: int = MAX_SPEC_BYTES,
                       what: str = "file") -> bytes:
    """The bytes of a regular file (not a directory, a FIFO that would block, or /dev/zero that never
    ends), refusing (with `error`, in one line) one over `max_bytes` before reading it."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, not a {what}")
        size = st.st_size
        if size > max_bytes:
            raise error(f"{p}: {what} is {size:,} bytes; at most {max_bytes:,} are allowed")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{p}: {what} is over {max_bytes:,} bytes")
    return data


def read_bounded_text(path: str | Path, *, error: type[Exception], max_bytes: int = MAX_SPEC_BYTES,
                      what: str = "file") -> str:
    """The UTF-8 text of a small regular file (`read_bounded_bytes`; a byte-order mark dropped)."""
    p = Path(path)
    data = read_bounded_bytes(p, error=error, max_bytes=max_bytes, what=what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{p}: not UTF-8 text") from None


class KeyTwice(ValueError):
    """A JSON object names a key twice (`unique_keys`); args[0] is the key."""


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook refusing an object that names a key twice ({"label": "pos", "label": "neg"}):
    json keeps the last silently."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise KeyTwice(k)
        out[k] = v
    return out


def parse_json_text(text: str, *, error: type[Exception], where: str):
    """json.loads with one-line errors (bad syntax, nesting too deep for the parser, a key given twice in one
    object: json keeps the last silently, as YAML specs are refused for it)."""
    import json

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except KeyTwice as exc:
        raise error(f"{where}: the key {exc.args[0]!r} is given twice in one object") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    except ValueError as exc:  # an integer literal past Python's digit limit for str -> int
        raise error(f"{where}: not valid JSON here (a number with more than {_max_digits():,} digits)"
                    if "integer string conversion" in str(exc) else f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None


def _max_digits() -> int:
    import sys

    return sys.get_int_max_str_digits()


def read_json_file(path: str | Path, *, error: type[Exception], max_bytes: int = MAX_SPEC_BYTES, what: str = "JSON file"):
    """A small JSON file, size-bounded before parsing; every failure is `error` with one line."""
    return parse_json_text(read_bounded_text(path, error=error, max_bytes=max_bytes, what=what), error=error,
                           where=str(path))


def _unique_keys_loader():
    """yaml's SafeLoader, refusing a mapping that names a key twice (safe_load keeps the last silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def read_yaml_file(path: str | Path, *, error: type[Exception], max_bytes: int = MAX_SPEC_BYTES, what: str = "YAML file"):
    """A small YAML file (safe_load), size-bounded before parsing; every failure is `error` with one line."""
    import yaml

    text = read_bounded_text(path, error=error, max_bytes=max_bytes, what=what)
    try:
        return yaml.load(text, Loader=_unique_keys_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise error(f"{path}: not valid YAML{at}{': ' + problem if problem else ''}") from None
    except RecursionError:
        raise error(f"{path}: YAML nested too deeply") from None


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C held until the block ends, then raised: around short writes whose libraries turn a
    KeyboardInterrupt raised inside them into other errors (matplotlib's savefig ended a stopped stream in a
    TypeError, exit 70, rather than "interrupted"). Only in the main thread, and only where Ctrl-C is not
    ignored already."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt
