"""Plain aligned text tables, the terminal form of every report."""


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain aligned text table; `align` holds 'l' or 'r' per column."""
    align = align or "l" * len(headers)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]

    def line(cells):
        out = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])
