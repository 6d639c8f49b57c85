"""`loraplex query "text"`: the routed model's answer, and with --trace which adapters took each token."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Base, Home, Json, SetOptions, parse_list, parse_sets, settings, split_quoted


MAX_INPUT_BYTES = 64 << 20  # a file of queries is read whole: 64 MiB is about a million tweets


def _stdin_text() -> str:
    """stdin's queries as text: read as bytes and decoded as UTF-8 here (Python's own reading would turn a
    byte that is not UTF-8 into a lone surrogate, which reached the tokenizer as exit 70), a BOM dropped."""
    from loraplex.errors import UserInputError

    if sys.stdin is None:
        raise UserInputError("stdin is closed: give a query, or --input FILE")
    buf = getattr(sys.stdin, "buffer", None)
    raw = buf.read(MAX_INPUT_BYTES + 1) if buf is not None else sys.stdin.read(MAX_INPUT_BYTES + 1).encode("utf-8", "surrogateescape")
    if len(raw) > MAX_INPUT_BYTES:
        raise UserInputError(f"stdin holds over {MAX_INPUT_BYTES:,} bytes of queries; split it")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"stdin: not UTF-8 text (byte {exc.start:,} is {raw[exc.start:exc.start + 1]!r})") from None


def _read_queries(text: Optional[str], input_: Optional[str]) -> list[str]:
    from loraplex.errors import UserInputError
    from loraplex.tasks import text_lines, visible

    if text is not None and input_ is not None:
        raise UserInputError("give a query or --input, not both")
    if input_ is not None:
        if input_ == "-":
            raw = _stdin_text()
        else:
            from loraplex.fsio import read_bounded_text, user_path

            input_ = user_path(input_)  # "" is refused as empty (Path("") was the working directory)
            if not input_.exists():
                raise UserInputError(f"{input_}: no such file")
            # regular files only (a FIFO would block, /dev/zero never end), at most 64 MiB, UTF-8 (a BOM dropped)
            raw = read_bounded_text(input_, error=UserInputError, max_bytes=MAX_INPUT_BYTES, what="file of queries")
        lines = [ln.strip() for ln in text_lines(raw) if visible(ln)]  # a line of zero-width spaces is blank too
        if not lines:
            raise UserInputError(f"{input_}: no queries (one per line)")
        return lines
    if text is None:
        if sys.stdin is not None and not sys.stdin.isatty():
            lines = [ln.strip() for ln in text_lines(_stdin_text()) if visible(ln)]
            if lines:
                return lines
        raise UserInputError("the query is empty: give a text, --input FILE, or queries on stdin")
    if not visible(text):  # as the server refuses it (a zero-width space was scored and logged as a candidate)
        raise UserInputError("the query is empty" + (" (no visible character)" if text.strip() else ""))
    return [text]


def query(
    text: Annotated[Optional[str], typer.Argument(help="The query (omit to read --input or stdin).", show_default=False)] = None,
    router: Annotated[Optional[str], typer.Option("--router", help="A stored router's name, 'retrieval' (the default), or 'auto' (route, generate an adapter, or fall back to the base, per query).")] = None,
    adapters: Annotated[Optional[str], typer.Option("--adapters", help="Adapters retrieval routes over (default: the whole registry).")] = None,
    input_: Annotated[Optional[str], typer.Option("--input", help="A file of queries, one per line ('-' for stdin).")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Show which adapter took each token, and per layer (--json always holds it).")] = False,
    shortlist: Annotated[Optional[int], typer.Option("--shortlist", help="Limit a learned router to the N adapters retrieval finds nearest each query (with the rest of a composition one answers with; one query a forward).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Retrieval and auto: adapters mixed per query (default: 1).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Queries per forward pass.")] = 32,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Retrieval or auto option KEY=VALUE (repeatable), e.g. route_threshold=0.5.")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Answer with one of these labels (comma-separated; a label that holds a comma in double quotes); retrieval and auto then prefer adapters trained on them.")] = None,
    base: Base = None,
    home: Home = None,
    json: Json = False,
) -> None:
    """Answer queries with the routed model (a label, or text for a causal LM); --trace shows the routing."""
    from loraplex import api

    queries = _read_queries(text, input_)

    sets = parse_sets(set_)
    if top_k is not None and "top_k" in sets:
        from loraplex.errors import UserInputError

        raise UserInputError("--top-k and --set top_k=... both set top_k: give one")
    cfg = SetOptions({**sets, **({"top_k": top_k} if top_k is not None else {})}) or None  # a stored router refuses it (router.query)
    res = api.query(queries, router=router, adapters=parse_list(adapters, "--adapters") or None, trace=trace or json, base=base,
                    shortlist=shortlist, batch_size=batch_size, config=cfg, settings=settings(home),
                    labels=split_quoted(labels, "--labels") if labels is not None else None)
    if json:
        items = [{"query": r["query"], "task": r["task"], "answer": r["answer"], "adapters": r["adapters"],
                  "tokens": r.get("tokens", []), "layers": r.get("layers", []),
                  **{k: r[k] for k in ("decision", "reason", "similarity", "margin", "nearest") if k in r}}
                 for r in res]
        out.emit_json(items[0] if text is not None and len(items) == 1 else items)
        return
    for r in res:
        ads = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in r["adapters"][:4])
        if len(r["adapters"]) > 4:  # the rest said, not dropped (sweep 65); --json lists them all
            ads += f", and {len(r['adapters']) - 4} more (--json lists them)"
        if len(res) > 1 or trace:
            out.line(f"query: {r['query']}")
        out.line(f"answer: {out.fmt(r['answer'])}   (task {r['task'] or '-'}; adapters: {ads or '-'})")
        if "decision" in r:
            out.line(f"decision: {r['decision']}: {r['reason']}")
        if trace and "tokens" in r:
            out.table(r["tokens"], ["token", "adapter", "weight"], title="per token (mean over layers)")
            out.table(r["layers"], ["layer", "adapter", "weight"], title="per layer (mean over tokens)")
        elif trace:  # auto generated an adapter or answered with the base: no routed forward to trace
            out.line(f"(no per-token trace: {r.get('decision', 'this answer')} used no routed forward)")
