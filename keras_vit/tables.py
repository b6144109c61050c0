"""Text tables for the CLI and the docs: plain (aligned columns) or Markdown."""


def format_table(rows, markdown=False, code_columns=()):
    """`rows[0]` is the header; `code_columns` are shown as `code` in Markdown."""
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += [
            "| " + " | ".join(f"`{cell}`" if i in code_columns else cell for i, cell in enumerate(row)) + " |"
            for row in rows[1:]
        ]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
