"""Benchmark results: the aligned table, result files (JSON + CSV + Markdown), comparing two runs.

A result row is a flat dict (one table row). Rows made by the suites carry two extra keys used by
`compare_files`: `key` (unique in a file: which configuration) and `primary` (the column that
measures speed, e.g. "fast_us" or "tok_s"); `higher_is_better` says which way is faster.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from . import provenance as _provenance

# Column headers for the table and the Markdown summary; a column not listed prints its key.
HEADERS = {
    "op": "op",
    "case": "case",
    "status": "check",
    "fast_us": "fast µs",
    "eager_us": "eager µs",
    "gbps": "GB/s",
    "tflops": "TFLOP/s",
    "pct_floor": "% floor",
    "bound": "bound",
    "speedup_eager": "× eager",
    "speedup_baselines": "× baselines",
    "noise_pct": "noise %",
    "engine": "engine",
    "scenario": "scenario",
    "dtype": "dtype",
    "tok_s": "tok/s",
    "tok_s_prefill": "tok/s +prefill",
    "ttft_ms": "TTFT ms",
    "itl_p50_ms": "ITL p50 ms",
    "itl_p99_ms": "ITL p99 ms",
    "weight_gbps": "weights GB/s",
    "pct_bw": "% copy BW",
    "speedup_hf": "× HF",
    "speedup_ct2": "× CT2",
    "note": "note",
}


def format_value(value) -> str:
    """A table cell: "-" for None, about three significant digits for floats, str otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _columns(rows: Sequence[dict], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """`rows` as an aligned text table: numbers right-aligned, text left-aligned.

    Parameters
    ----------
    rows : sequence of dict
        One dict per row; a missing key prints "-".
    columns : sequence of str, optional
        The keys to show, in order (default: every key, in first-seen order).

    Examples
    --------
    >>> print(format_table([{"op": "sample", "fast_us": 12.34}], ["op", "fast_us"]))
    op      fast µs
    ------  -------
    sample     12.3
    """
    columns = _columns(rows, columns)
    headers = [HEADERS.get(c, c) for c in columns]
    cells = [[format_value(row.get(c)).replace("\n", " ") for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) or row.get(c) is None
            for row in rows)
        for c in columns
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |"]
    out.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        out.append("| " + " | ".join(esc(format_value(row.get(c))) for c in columns) + " |")
    return "\n".join(out)


def _jsonable(value):
    """Rows may hold torch dtypes, Paths or tuples: JSON gets plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def save(
    name: str,
    rows: Sequence[dict],
    out_dir: str | Path,
    columns: Sequence[str] | None = None,
    *,
    provenance: dict | None = None,
    notes: Iterable[str] = (),
    formats: Iterable[str] = ("json", "csv", "md"),
) -> dict[str, Path]:
    """Write `rows` with their provenance as `<name>-<device-slug>-<YYYYMMDD-HHMMSS>.{json,csv,md}`.

    Parameters
    ----------
    name : str
        What was measured, e.g. "ops", "e2e", "block_manager": the file name's first part.
    rows : sequence of dict
        The result rows (flat dicts; nested values are kept in JSON, stringified in CSV).
    out_dir : str or Path
        Folder for the files (created if missing).
    columns : sequence of str, optional
        Columns of the CSV and the Markdown table, in order (default: every key in first-seen order).
        The JSON always keeps every key.
    provenance : dict, optional
        Default: `provenance.collect()` now.
    notes : iterable of str
        Lines stored in the JSON and printed above the Markdown table (e.g. "weights are random").
    formats : iterable of str
        Which of "json", "csv", "md" to write.

    Returns
    -------
    dict[str, Path]
        The written files by format.
    """
    formats = list(formats)
    unknown = set(formats) - {"json", "csv", "md"}
    if unknown:
        raise ValueError(f"save: unknown formats {sorted(unknown)}; allowed: json, csv, md")
    facts = provenance if provenance is not None else _provenance.collect()
    columns = _columns(rows, columns)
    notes = list(notes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{name}-{_provenance.device_slug(facts)}-{stamp}"
    paths: dict[str, Path] = {}
    if "json" in formats:
        paths["json"] = out_dir / f"{stem}.json"
        doc = {"name": name, "provenance": facts, "notes": notes, "columns": columns, "rows": list(rows)}
        paths["json"].write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    if "csv" in formats:
        paths["csv"] = out_dir / f"{stem}.csv"
        with paths["csv"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else _jsonable(row.get(c)) for c in columns])
    if "md" in formats:
        paths["md"] = out_dir / f"{stem}.md"
        head = [
            f"## {name} on {facts.get('device')}",
            "",
            f"- driver {facts.get('driver_version')}, CUDA {facts.get('cuda_version')}, "
            f"torch {facts.get('torch')}, triton {facts.get('triton')}, "
            f"transformers {facts.get('transformers')}, Python {facts.get('python')}",
            f"- commit {facts.get('git_commit')}{' (dirty)' if facts.get('git_dirty') else ''}, "
            f"{facts.get('date_utc')}",
            f"- command: `{facts.get('command')}`",
        ]
        head += [f"- {note}" for note in notes]
        paths["md"].write_text("\n".join(head) + "\n\n" + _markdown_table(rows, columns) + "\n")
    return paths


class PartialResults:
    """A result file kept up to date while a suite runs, so a run cut short (a timeout's SIGINT,
    SIGTERM, a crash) still leaves the rows it measured.

    `<name>-<device-slug>-<start stamp>.partial.json` (the `save` JSON layout plus
    `"partial": true`) is written at once with no rows, then rewritten with every `update`
    (atomically: a reader never sees half a file). `finish()` removes it once `save` has written
    the complete files; `interrupted(reason)` adds a note saying where the run stopped.

    Parameters
    ----------
    name, out_dir, columns, provenance, notes :
        As for `save`.
    """

    def __init__(self, name: str, out_dir: str | Path, columns: Sequence[str] | None, *,
                 provenance: dict, notes: Iterable[str] = ()):
        self.name = name
        self.columns = list(columns) if columns is not None else None
        self.provenance = provenance
        self.rows: list[dict] = []
        self.notes = list(notes)
        self.finished = False
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{name}-{_provenance.device_slug(provenance)}-{stamp}.partial.json"
        self._write()

    def update(self, rows: Sequence[dict], notes: Iterable[str] | None = None) -> None:
        """Replace the rows (and the notes, if given) and rewrite the file."""
        self.rows = list(rows)
        if notes is not None:
            self.notes = list(notes)
        self._write()

    def interrupted(self, reason: str) -> Path:
        """Rewrite the file with a note that the run stopped early; returns its path."""
        self.notes.append(f"PARTIAL: the run stopped early ({reason}); these are the rows measured until then")
        self._write()
        return self.path

    def finish(self) -> None:
        """The complete files are written: the partial one goes."""
        self.finished = True
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        doc = {"name": self.name, "partial": True, "provenance": self.provenance, "notes": self.notes,
               "columns": _columns(self.rows, self.columns), "rows": self.rows}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
        tmp.replace(self.path)


# Column-name endings that measure time (lower is faster) or rate (higher is faster), used for
# rows that do not name a `primary` column.
_LOWER = ("_us", "_ms", "_ns", "_s_per_step")
_HIGHER = ("tok_s", "_per_s", "gbps", "ops_s")


def _row_key(row: dict) -> str:
    if "key" in row:
        return str(row["key"])
    return " / ".join(str(v) for v in row.values() if isinstance(v, str))


def _speed_columns(row: dict) -> list[tuple[str, bool]]:
    """(column, higher_is_better) pairs compared between runs for this row."""
    if row.get("primary"):
        return [(row["primary"], bool(row.get("higher_is_better", False)))]
    found = []
    for column, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if column.endswith(_LOWER):
                found.append((column, False))
            elif column.endswith(_HIGHER):
                found.append((column, True))
    return found


def compare_rows(old_rows: Sequence[dict], new_rows: Sequence[dict], threshold: float = 0.05) -> list[dict]:
    """Per configuration in both runs: speed ratio new/old (>1 means faster) and a regression flag.

    A row regresses when new speed < (1 - threshold) × old speed. Rows present in only one run,
    or whose check did not pass in either run, are listed with a note and never flagged.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"compare threshold must be in [0, 1), got {threshold!r}")
    old = {_row_key(r): r for r in old_rows}
    out = []
    for new in new_rows:
        key = _row_key(new)
        prev = old.pop(key, None)
        if prev is None:
            out.append(dict(key=key, metric=None, old=None, new=None, ratio=None, verdict="new row"))
            continue
        columns = _speed_columns(new)
        if not columns:
            out.append(dict(key=key, metric=None, old=None, new=None, ratio=None, verdict="no speed column"))
        for column, higher in columns:
            a, b = prev.get(column), new.get(column)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a <= 0 or b <= 0:
                out.append(dict(key=key, metric=column, old=a, new=b, ratio=None, verdict="not comparable"))
                continue
            ratio = b / a if higher else a / b
            verdict = "REGRESSION" if ratio < 1 - threshold else ("faster" if ratio > 1 + threshold else "same")
            out.append(dict(key=key, metric=column, old=a, new=b, ratio=ratio, verdict=verdict))
    out += [dict(key=k, metric=None, old=None, new=None, ratio=None, verdict="missing in new") for k in old]
    return out


def load(path: str | Path) -> dict:
    """A result file written by `save` (JSON), with a clear error for anything else."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark results from {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path} is not a gptfast result file (a JSON object with a 'rows' list)")
    return doc


def compare_files(old_path: str | Path, new_path: str | Path, threshold: float = 0.05) -> tuple[str, int]:
    """The comparison of two result files as printable text, and the number of regressions."""
    old_doc, new_doc = load(old_path), load(new_path)
    rows = compare_rows(old_doc["rows"], new_doc["rows"], threshold)
    lines = []
    for label, doc, path in (("old", old_doc, old_path), ("new", new_doc, new_path)):
        facts = doc.get("provenance", {})
        lines.append(
            f"{label}: {path}  [{facts.get('device')}, torch {facts.get('torch')}, "
            f"commit {str(facts.get('git_commit'))[:12]}, {facts.get('date_utc')}]"
        )
    if old_doc.get("provenance", {}).get("device") != new_doc.get("provenance", {}).get("device"):
        lines.append("WARNING: the two runs were measured on different devices; ratios mix hardware.")
    table_rows = [dict(r, ratio=(f"{r['ratio']:.3f}×" if r["ratio"] is not None else None)) for r in rows]
    lines.append("")
    lines.append(format_table(table_rows, ["key", "metric", "old", "new", "ratio", "verdict"]))
    regressions = sum(r["verdict"] == "REGRESSION" for r in rows)
    lines.append("")
    lines.append(
        f"{regressions} regression(s) beyond {threshold:.0%} "
        "(ratio = new speed / old speed; > 1 is faster)"
    )
    return "\n".join(lines), regressions
