"""`python -m gptfast.bench.summary OUT_DIR [STEPS_FILE]`: one short summary of a GPU check.

Reads every result JSON in OUT_DIR (written by `save`), writes OUT_DIR/summary.md (provenance,
the check's step statuses, one table per result file) and prints the same tables as aligned
text, last, so the end of a log shows them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import results

# The short tables: the columns that fit a terminal.
SHORT = {
    "ops": ["op", "case", "status", "fast_us", "eager_us", "gbps", "tflops", "pct_floor", "speedup_eager",
            "speedup_baselines"],
    "e2e": ["model", "scenario", "engine", "dtype", "status", "tok_s", "ttft_ms", "itl_p50_ms", "itl_p99_ms",
            "pct_bw", "speedup_hf"],
}
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
        text.append("steps:\n" + "\n".join(f"  {s}" for s in steps))
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
        text.append(f"{path.name} ({facts.get('device')}):\n" + results.format_table(doc["rows"], columns)
                    + "".join(f"\n  {n}" for n in picked))
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
