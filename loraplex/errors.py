"""The exception types every part of loraplex raises.

Each one carries a message written for the person at the terminal: the CLI prints `error: <message>`
on one line and exits with `exit_code`, never a traceback (see `loraplex/cli/_errors.py`). Library
callers catch `LoraplexError` (or a subclass) instead of parsing text.
"""

from __future__ import annotations

import errno

PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ENOENT, errno.EISDIR, errno.ELOOP, errno.EACCES,
                         errno.EEXIST, errno.EROFS, errno.EPERM})
"""OS errors about a path the caller gave (a missing or unwritable place, a file where a folder is due)."""


MAX_MESSAGE = 1000
"""Characters of an error message shown (one quoting a 100,000-character argument is cut short): the CLI's line,
an API caller's exception (sweep 69: a lookup echoed the whole name)."""


def cut_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit - 40]}... ({len(text):,} characters)"


class LoraplexError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `field`, where set, names the input the error is
    about (`description`, `task`, `labels`, ...), so a caller that took several inputs (a request body)
    can say which one."""

    exit_code = 1
    field: str | None = None

    def about(self, field: str) -> "LoraplexError":
        """This error, marked as being about input `field` (the first mark stays)."""
        if self.field is None:
            self.field = field
        return self


class UserInputError(LoraplexError):
    """Something the user gave us is wrong (a path, a name, a spec). Exit code 2."""

    exit_code = 2


class InvalidName(UserInputError):
    """An adapter, router or generator name that would not be safe as a key or a file name."""


class NotFound(UserInputError):
    """A named thing does not exist. Subclasses say which kind."""


class AdapterNotFound(NotFound):
    pass


class ComponentNotFound(NotFound):
    """A router or generator record that is not in the registry."""


class TaskNotFound(NotFound):
    pass


class ModelNotFound(NotFound):
    pass


class UnknownComponent(NotFound):
    """A name that no Catalog knows (an unknown router method, regularizer, generator...)."""


class AlreadyExists(UserInputError):
    """A name that is already taken in the registry."""


class InvalidAdapter(UserInputError):
    """An adapter directory or file that cannot be read as a LoRA adapter (missing, corrupt, unsupported)."""


class IncompatibleAdapter(UserInputError):
    """An adapter that does not fit a base model (modules or shapes), or adapters of different bases."""


class InvalidTaskFile(UserInputError):
    """A task file that is malformed: a missing column, no rows, a label outside the label set..."""


class InvalidSpec(UserInputError):
    """A configuration or spec that does not validate.

    `option`: the keyword option at fault (`batch_size`), when the error is about one option a caller
    passed by name, so the CLI can say it by the flag the user typed (`--batch-size`)."""

    option: str | None = None


class DamagedRun(UserInputError):
    """A stream run directory whose saved files cannot be read back (run.json, spec.json, a unit's state)."""


class LoraplexWarning(UserWarning):
    """Something the user should know that did not stop the command (a blob a removal could not delete):
    `warnings.warn(..., LoraplexWarning)`; the CLI prints it as one `warning:` line."""


class IntegrityError(LoraplexError):
    """Stored data does not match its recorded hash or shape: the registry has been tampered with or damaged."""


class Unreadable(IntegrityError):
    """A stored file this user may not read (permission denied). Not damage (`registry check` does not
    advise removing it), but to a command it is as unusable as a damaged one, and is routed around alike
    (an IntegrityError: the other adapters still answer)."""


class DiskFull(LoraplexError):
    """A write ran out of space (ENOSPC, SQLite's 'database or disk is full'); nothing was committed."""


class LockUnavailable(LoraplexError):
    """The registry's lock file cannot be opened (a read-only home, a directory in its place)."""


class RegistryBusy(LoraplexError):
    """Another process holds the registry's write lock for longer than we are willing to wait."""


class OutOfMemory(LoraplexError):
    """An allocation a request needed failed (host RAM or GPU memory); what was there before is unchanged."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: MemoryError, torch's OutOfMemoryError (CUDA), or an error
    saying so (the CPU allocator's "can't allocate memory", MPS's "out of memory", a loader's own)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def as_out_of_memory(exc: BaseException, where: str) -> "OutOfMemory | None":
    """A failed allocation (`out_of_memory`) raised inside `where` as the OutOfMemory the CLI and the api name
    it with; None for any other exception (a LoraplexError is itself already)."""
    if isinstance(exc, LoraplexError) or not out_of_memory(exc):
        return None
    first = (str(exc).strip().splitlines() or [""])[0]
    return OutOfMemory(f"out of memory ({type(exc).__name__}{': ' + first if first else ''}): {where} needed more "
                       "memory than this process may use")


def server_state(exc: BaseException) -> bool:
    """Whether `exc` is the state of the machine a server runs on, not a bug: out of memory, its database
    failing under it (SQLite's own errors), no file descriptors left. A server answers these with a 503 and
    logs one line for them (the traceback is for bugs)."""
    return (out_of_memory(exc) or type(exc).__module__ == "sqlite3"
            or (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)))


class NonFiniteScores(LoraplexError):
    """The model's scores for a text hold NaN or infinity (an adapter, or 16-bit precision, overflows the
    forward): no answer is read from them (an argmax over NaN named the first label)."""


class MissingDependency(LoraplexError):
    """An optional package (an embedded model or dataset, faiss) is not installed."""


class Diverged(UserInputError):
    """Training ended with NaN or infinite weights; the message says where and what to lower, `detail`
    where alone (for a caller that words its own advice: a stream names its spec keys)."""

    def __init__(self, message: str, *, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class Interrupted(LoraplexError):
    """A long command stopped by Ctrl-C (exit code 130) or SIGTERM (`signal="SIGTERM"`: 143); the message
    says what was kept and how to continue."""

    exit_code = 130

    def __init__(self, message: str, *, signal: str = "SIGINT"):
        super().__init__(message)
        self.signal = signal
        self.exit_code = 143 if signal == "SIGTERM" else 130


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised by the handler the CLI installs (`terminate`). A BaseException, as
    KeyboardInterrupt is: an Exception raised there landed in libraries' `except Exception` blocks (an
    import's fallback, a `__del__`), was swallowed, and the command ran on and registered its adapter."""

    def __init__(self, signal: str = "SIGTERM"):
        super().__init__(f"terminated ({signal}) before the command finished; the registry keeps only complete "
                         "writes")
        self.signal = signal


_TERMINATION: list[str] = []
_SAVED: list[str] = []
"""What the registry saved during this command (`saved`), newest last; the CLI clears it as a command begins."""
_SAVED_SHOWN = 3


def saved(what: str) -> None:
    """Note a registry write that committed ("register adapter 'x'"): a Ctrl-C or SIGTERM that lands after it,
    before the command reports, must not read as "nothing was done" (sweep 67: `adapters register` said
    "interrupted", exit 130, with its adapter registered, and the rerun was refused as a duplicate)."""
    _SAVED.append(what)
    del _SAVED[:-100]  # a long-lived process (the server) keeps the last few only


def clear_saved() -> None:
    _SAVED.clear()


def saved_note() -> str:
    """"; saved before it: register adapter 'x'" (the last few, and how many more), or "" when nothing was."""
    if not _SAVED:
        return ""
    last = _SAVED[-_SAVED_SHOWN:]
    more = f" (and {len(_SAVED) - len(last)} earlier)" if len(_SAVED) > len(last) else ""
    return f"; saved before it: {', '.join(last)}{more}"


def terminate(signal: str) -> None:
    """The CLI's SIGTERM/SIGHUP handler: remembers the request (so one swallowed raise cannot lose it: the
    registry's next transaction raises it again, `check_termination`) and raises Terminated."""
    _TERMINATION.append(signal)
    raise Terminated(signal)


def interrupt() -> None:
    """The CLI's SIGINT handler: remembers the Ctrl-C and raises KeyboardInterrupt, as Python's own does.
    Raised inside a `__del__` (a profiler's, during garbage collection) it is swallowed ("Exception ignored
    in ...") and the command ran on to its end, exit 0; remembered, the next registry write raises it again."""
    _TERMINATION.append("SIGINT")
    raise KeyboardInterrupt


def check_termination() -> None:
    """Raise again a Ctrl-C (KeyboardInterrupt) or a SIGTERM/SIGHUP (Terminated) that has come: before a
    registry write begins."""
    if _TERMINATION:
        if _TERMINATION[0] == "SIGINT":
            raise KeyboardInterrupt
        raise Terminated(_TERMINATION[0])


def file_size_limit() -> int | None:
    """The largest file this process may write (RLIMIT_FSIZE, `ulimit -f`, in bytes), or None when unlimited."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def file_size_note(exc: BaseException) -> str:
    """"; this process may write files of at most N bytes (ulimit -f): raise the limit" when `exc` is what a write
    past a file-size limit gives (EFBIG, SQLite's "disk I/O error") and such a limit is set; else "". A database
    or a blob write under `ulimit -f` read as a damaged database and sent the user to `registry check`, which found
    nothing (sweep 70)."""
    limit = file_size_limit()
    if limit is None:
        return ""
    if not ((isinstance(exc, OSError) and exc.errno == errno.EFBIG) or "disk i/o error" in str(exc).lower()):
        return ""
    return f"; this process may write files of at most {limit:,} bytes (ulimit -f): raise the limit"


def os_error(exc: OSError) -> LoraplexError:
    """An OS error as loraplex reports it: one line naming the path; a UserInputError when it is about a
    path the caller gave (PATH_ERRNOS), else a LoraplexError (the CLI prints both as `error: ...`)."""
    if exc.errno == errno.ENOSPC:  # a copy's target (filename2) is the file that did not fit, not its temp source
        return DiskFull(f"the disk is full ({getattr(exc, 'filename2', None) or exc.filename or exc.strerror})")
    name = str(exc.filename) if getattr(exc, "filename", None) else ""
    where = f" ({name if len(name) <= 120 else name[:117] + '...'})" if name else ""
    cls = UserInputError if exc.errno in PATH_ERRNOS else LoraplexError
    return cls(f"{exc.strerror or exc}{where}{file_size_note(exc)}")
