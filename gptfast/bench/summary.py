"""`python -m gptfast.bench.summary OUT_DIR [STEPS_FILE]`: one short summary of a GPU check.

Reads every result JSON in OUT_DIR (written by `save`), writes OUT_DIR/summary.md (provenance,
the check's step statuses, one table per result file) and prints the same tables as aligned
text within 100 columns (one heading per op, or per model and scenario), last, so the end of a
log shows them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Sequence

from . import results

WIDTH = 120  # the terminal width the printed tables fit in
SUMMARY_WIDTH = 100  # the summary's tables: the end of a log read in a narrower window
NOISY_PCT = 10.0  # a row whose repeats differ by more than this (%) is flagged noisy

# The short tables: the columns that fit a terminal.
SHORT = {
    "ops": ["op", "case", "status", "fast_us", "eager_us", "gbps", "tflops", "pct_floor", "speedup_eager",
            "speedup_baselines"],
    "e2e": ["model", "scenario", "engine", "dtype", "status", "tok_s", "ttft_ms", "itl_p50_ms", "itl_p99_ms",
            "pct_bw", "speedup_hf"],
}
# What the screen tables show, per suite: (grouped by: one heading per group, columns).
SCREEN = {
    "ops": (("op",), ["case", "status", "fast_us", "eager_us", "gbps", "tflops", "pct_floor", "bound",
                      "speedup_eager", "speedup_baselines", "noise_pct"]),
    "e2e": (("model", "run_dtype", "scenario"), ["engine", "dtype", "status", "tok_s", "tok_s_prefill", "ttft_ms",
                                             "itl_p50_ms", "itl_p99_ms", "weight_gbps", "pct_bw", "speedup_hf",
                                             "speedup_ct2", "noise_pct"]),
}
# Shorter headers for the screen (the result files keep `results.HEADERS`).
SCREEN_HEADERS = {"tok_s_prefill": "+prefill", "weight_gbps": "wt GB/s", "pct_bw": "% BW", "itl_p50_ms": "ITL p50",
                  "itl_p99_ms": "ITL p99", "noise_pct": "noise %"}
SCREEN_LEGEND = {
    "e2e": "tok/s: decode tokens/s (batch 1) or useful tokens/s (mixed); +prefill: tokens/s with prefill; "
           "TTFT, ITL p50/p99 in ms; wt GB/s: weights read per second; % BW: of the measured copy bandwidth; "
           "× HF: over HF generate in the same run; × CT2: over CTranslate2 at the same weight precision "
           "(CPU, when installed); noise %: spread of the repeats",
}


def flag_noisy(rows: Sequence[dict], threshold: float = NOISY_PCT) -> int:
    """Mark rows whose repeat-to-repeat spread (`noise_pct`) exceeds `threshold` %: `noisy=True`
    and a note. Returns how many were marked."""
    count = 0
    for row in rows:
        noise = row.get("noise_pct")
        if isinstance(noise, (int, float)) and noise > threshold:
            row["noisy"] = True
            flag = f"NOISY: the repeats differ by {noise:.0f}% (> {threshold:.0f}%)"
            row["note"] = f"{flag}; {row['note']}" if row.get("note") else flag
            count += 1
    return count


def screen_table(rows: Sequence[dict], columns: Sequence[str], group_by: Sequence[str] = (),
                 width: int = WIDTH, row_notes: bool = True) -> str:
    """`rows` as aligned text tables that fit in `width` characters.

    One table per group of rows sharing the `group_by` values (a heading line names them);
    columns empty in every row of a group are left out; text columns that would make the table
    wider than `width` move, with each row's note, under the table as wrapped lines.

    Parameters
    ----------
    rows : sequence of dict
        Result rows (see `results`).
    columns : sequence of str
        Candidate columns in order; the first labels the lines under the table.
    group_by : sequence of str
        Row keys whose values split the rows into tables.
    width : int
        The widest line allowed (headings and notes are wrapped to it too).
    row_notes : bool
        Print each row's note under the table (the moved columns are printed either way).

    Examples
    --------
    >>> print(screen_table([{"op": "sample", "case": "B=1", "eager_us": 12.3, "note": "checked"}],
    ...                    ["case", "eager_us"], group_by=["op"]))
    sample
    case  eager µs
    ----  --------
    B=1       12.3
      B=1: checked
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(g) for g in group_by), []).append(row)
    out = []
    for key, members in groups.items():
        cols = [c for c in columns if any(r.get(c) is not None for r in members)]
        screen = [{SCREEN_HEADERS.get(c, results.HEADERS.get(c, c)): r.get(c) for c in cols} for r in members]
        names = [SCREEN_HEADERS.get(c, results.HEADERS.get(c, c)) for c in cols]
        moved: list[str] = []
        table = results.format_table(screen, names)
        while max(map(len, table.splitlines())) > width and len(names) > 2:
            text_cols = [n for n in names[1:] if any(isinstance(r.get(n), str) for r in screen)]
            victim = max(text_cols or names[-1:], key=lambda n: max(len(results.format_value(r.get(n)))
                                                                  for r in screen))
            names.remove(victim)
            moved.append(victim)
            table = results.format_table(screen, names)
        lines = [" · ".join(str(k) for k in key)] if group_by else []
        lines.append(table)
        for row, shown in zip(members, screen):
            extra = [f"{n}: {results.format_value(shown[n])}" for n in moved if shown.get(n) is not None]
            if row_notes and row.get("note"):
                extra.append(str(row["note"]))
            if extra:
                lines += textwrap.wrap(f"{shown[names[0]]}: " + "; ".join(extra), width,
                                       initial_indent="  ", subsequent_indent="      ")
        out.append("\n".join(lines))
    return "\n\n".join(out)

# The short tables' groups: one heading per group instead of a column repeated on every row.
SHORT_GROUPS = {"ops": ("op",), "e2e": ("model", "scenario")}
# Notes worth printing under the short table too (matched anywhere in the note).
SHORT_NOTES = {
    "e2e": ("decode step at batch 1", "CUDA graphs", "kernel count failed", "the e2e run raised"),
}


def summarize(out_dir: Path, steps: list[str]) -> str:
    """Write out_dir/summary.md; return the text tables."""
    docs = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            docs.append((path, results.load(path)))
        except ValueError:
            continue
    md = ["# gptfast GPU check", ""]
    text = []
    if steps:
        md += ["| step | result |", "|---|---|"] + [f"| {s.split(':', 1)[0]} | {s.split(':', 1)[-1].strip()} |"
                                                    for s in steps]
        text.append("steps:\n" + "\n".join(line for s in steps for line in textwrap.wrap(
            s, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="    ")))
    for path, doc in docs:
        facts = doc.get("provenance", {})
        columns = SHORT.get(doc.get("name"), doc.get("columns"))
        md += ["", f"## {path.name}", "",
               f"{facts.get('device')}, driver {facts.get('driver_version')}, CUDA {facts.get('cuda_version')}, "
               f"torch {facts.get('torch')}, triton {facts.get('triton')}, commit {facts.get('git_commit')}, "
               f"{facts.get('date_utc')}", ""]
        md += [f"- {note}" for note in doc.get("notes", [])]
        md += ["", results._markdown_table(doc["rows"], columns)]
        failures = [r for r in doc["rows"] if r.get("status") in ("FAIL", "ERROR")]
        md += [f"\n**{r['status']}** {r.get('key')}: {r.get('report') or r.get('note')}" for r in failures]
        wanted = SHORT_NOTES.get(doc.get("name"), ())
        picked = [n for n in doc.get("notes", []) if any(w in n for w in wanted)]
        group_by = SHORT_GROUPS.get(doc.get("name"), ())
        table = screen_table(doc["rows"], [c for c in columns if c not in group_by], group_by,
                             width=SUMMARY_WIDTH, row_notes=False)
        notes = [line for n in picked for line in textwrap.wrap(n, SUMMARY_WIDTH, initial_indent="  ",
                                                               subsequent_indent="    ")]
        text.append("\n".join(textwrap.wrap(f"{path.name} ({facts.get('device')}):", SUMMARY_WIDTH))
                    + "\n" + table + "".join(f"\n{line}" for line in notes))
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    return "\n\n".join(text)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python -m gptfast.bench.summary OUT_DIR [STEPS_FILE]", file=sys.stderr)
        return 2
    steps = Path(argv[1]).read_text().splitlines() if len(argv) == 2 and Path(argv[1]).exists() else []
    print(summarize(Path(argv[0]), steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
