#!/usr/bin/env python3
"""Turn benchmark result rows (JSON lines) into a markdown table and, optionally, a speedup plot.

    python benchmarks/report.py                              # all benchmarks/results/*.jsonl
    python benchmarks/report.py out/results.jsonl            # just these files
    python benchmarks/report.py --readme README.md           # also rewrite the README's table
    python benchmarks/report.py --plot perf.png              # also draw the speedups

Input: files of JSON objects, one per line, as written by ``pynas bench --out FILE.jsonl``
(blank lines and lines starting with ``#`` are ignored; malformed lines are reported on
stderr and skipped). For each (device, benchmark, size, provider) only the newest row, by its
``date`` field, is kept; rows from several runs and machines can therefore share one folder.

Table columns:
  device, benchmark, size, provider
  median      median time per iteration in ms (3 significant digits)
  min-max     fastest and slowest repeat in ms
  speedup     reference median / provider median, as measured in the same run
              (the row's "speedup" field; computed from the newest reference row of the
              same device/benchmark/size when absent); "-" for the reference itself
  graph MiB   bytes held by the autograd graph after a training forward ("memory_bytes")
  GPU peak MiB  peak GPU memory allocated ("peak_bytes")
  launches    GPU kernel launches per iteration
  bandwidth   achieved fraction "bandwidth_fraction" (as pynas bench defines it: of the
              bandwidth a plain copy of the same bytes reaches) and the GB/s
  notes       compile time ("compile 85 s"), the note, and the status of rows that did not
              run ("skipped: ...", "error: ...")
Cells with no value are blank; an optional column with no value on any row is left out
(--all-columns keeps it). Rows are sorted by device, benchmark, size, then provider in the
order reference, compiled, pynas, pynas-*.

--readme FILE replaces the text between the lines ``<!-- perf-table -->`` and
``<!-- /perf-table -->`` in FILE with the table (the markers stay; an error is raised when
they are missing, repeated or out of order; the file is then left untouched).

--plot FILE writes a PNG: one group of horizontal bars per (device, benchmark, size), one bar
per provider giving its speedup over the reference (the dashed line at 1.0). It needs
matplotlib (``pip install ".[bench]"``); without it the plot is skipped with a message and
the table part still succeeds.

Exit status: 0 on success, 1 when no rows could be read or the README could not be updated,
2 on bad arguments.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BEGIN_MARKER = "<!-- perf-table -->"
END_MARKER = "<!-- /perf-table -->"
MIB = float(1 << 20)

PROVIDER_ORDER = ("reference", "compiled", "pynas")
BENCHMARK_ORDER = (
    "mixed_sum_fwd",
    "mixed_sum_bwd",
    "mixed_sum_fwd_bwd",
    "cnn_edge_fwd_bwd",
    "cnn_search_first_order",
    "cnn_search_second_order",
)

Row = Dict[str, object]
Key = Tuple[str, str, str, str]


# ----------------------------------------------------------------------------- reading


def _parse_date(value: object) -> Optional[datetime]:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith("Z"):  # fromisoformat before Python 3.11 does not take "Z"
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


_EPOCH = datetime(1, 1, 1, tzinfo=timezone.utc)


def read_rows(paths: Sequence[str]) -> List[Row]:
    """All rows of the given JSON-lines files, in file order; bad lines warned about and skipped."""
    rows: List[Row] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except OSError as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            continue
        for lineno, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                print(f"report: {path}:{lineno}: not JSON ({exc.msg}); skipped", file=sys.stderr)
                continue
            if not isinstance(row, dict):
                print(f"report: {path}:{lineno}: not a JSON object; skipped", file=sys.stderr)
                continue
            missing = [f for f in ("benchmark", "provider") if not row.get(f)]
            if missing:
                print(f"report: {path}:{lineno}: no {', '.join(missing)}; skipped", file=sys.stderr)
                continue
            rows.append(row)
    return rows


def _key(row: Row) -> Key:
    return (
        str(row.get("device") or row.get("device_type") or "unknown device"),
        str(row.get("benchmark")),
        str(row.get("size") or ""),
        str(row.get("provider")),
    )


def newest(rows: Iterable[Row]) -> Dict[Key, Row]:
    """For each (device, benchmark, size, provider), the row with the latest date (later line on ties)."""
    best: Dict[Key, Tuple[Tuple[datetime, int], Row]] = {}
    for index, row in enumerate(rows):
        rank = (_parse_date(row.get("date")) or _EPOCH, index)
        key = _key(row)
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, row)
    return {key: row for key, (_, row) in best.items()}


# ----------------------------------------------------------------------------- ordering


def _natural(text: str) -> Tuple:
    """Sort key that orders embedded numbers numerically ("B=8" before "B=16")."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def provider_rank(provider: str) -> Tuple:
    if provider in PROVIDER_ORDER:
        return (PROVIDER_ORDER.index(provider), "")
    if provider.startswith("pynas-"):
        return (len(PROVIDER_ORDER), provider)
    return (len(PROVIDER_ORDER) + 1, provider)


def benchmark_rank(benchmark: str) -> Tuple:
    if benchmark in BENCHMARK_ORDER:
        return (0, BENCHMARK_ORDER.index(benchmark), "")
    return (1, 0, benchmark)


def sort_key(key: Key) -> Tuple:
    device, benchmark, size, provider = key
    return (device, benchmark_rank(benchmark), _natural(size), provider_rank(provider))


# ----------------------------------------------------------------------------- formatting


def _num(value: object) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, without exponent notation (1234 -> "1230")."""
    if value == 0:
        return "0"
    value = float(f"{value:.{digits - 1}e}")  # round first: 99.97 -> 100, not "100.0"
    decimals = digits - 1 - int(math.floor(math.log10(abs(value))))
    if decimals > 0:
        return f"{value:.{decimals}f}"
    return f"{round(value, decimals):.0f}"


def _ms(seconds: object) -> Optional[str]:
    value = _num(seconds)
    return None if value is None else sig(value * 1e3)


def _mib(nbytes: object) -> Optional[str]:
    value = _num(nbytes)
    return None if value is None else sig(value / MIB)


def _ok(row: Row) -> bool:
    return str(row.get("status") or "ok") == "ok"


def speedup_of(key: Key, table: Dict[Key, Row]) -> Optional[float]:
    """The row's own speedup, else reference median / this median from the newest reference row."""
    row = table[key]
    if not _ok(row):
        return None
    value = _num(row.get("speedup"))
    if value is not None:
        return value
    ratio = _num(row.get("ratio"))
    if ratio:
        return 1.0 / ratio
    ref = table.get(key[:3] + ("reference",))
    if ref is None or not _ok(ref):
        return None
    ref_median, median = _num(ref.get("median_s")), _num(row.get("median_s"))
    if ref_median is None or not median:
        return None
    return ref_median / median


def _notes(row: Row) -> str:
    parts = []
    status = str(row.get("status") or "ok")
    note = row.get("note")
    note = str(note).strip() if note not in (None, "") else ""
    if status != "ok":
        parts.append(f"{status}: {note}" if note else status)
    elif note:
        parts.append(note)
    compile_s = _num(row.get("compile_s"))
    if compile_s is not None:
        parts.append(f"compile {f'{compile_s:.2g}' if compile_s < 10 else f'{compile_s:.0f}'} s")
    return "; ".join(parts)


def _bandwidth(row: Row) -> Optional[str]:
    fraction, gbs = _num(row.get("bandwidth_fraction")), _num(row.get("bandwidth_gbs"))
    if fraction is None and gbs is None:
        return None
    if fraction is None:
        return f"{sig(gbs)} GB/s"
    text = f"{fraction * 100:.0f}%"
    return f"{text} ({sig(gbs)} GB/s)" if gbs is not None else text


# (header, cell function, optional)
def _columns(table: Dict[Key, Row]):
    def min_max(key, row):
        lo, hi = _ms(row.get("min_s")), _ms(row.get("max_s"))
        return f"{lo}-{hi}" if lo is not None and hi is not None else None

    def speedup(key, row):
        if key[3] == "reference":
            return "-"
        value = speedup_of(key, table)
        return None if value is None else f"{value:.2f} x"

    def launches(key, row):
        value = _num(row.get("launches"))
        return None if value is None else f"{value:.0f}"

    return [
        ("device", lambda k, r: k[0], False),
        ("benchmark", lambda k, r: k[1], False),
        ("size", lambda k, r: k[2], False),
        ("provider", lambda k, r: k[3], False),
        ("median ms", lambda k, r: _ms(r.get("median_s")) if _ok(r) else None, False),
        ("min-max ms", lambda k, r: min_max(k, r) if _ok(r) else None, False),
        ("speedup vs reference", speedup, False),
        ("graph MiB", lambda k, r: _mib(r.get("memory_bytes")), True),
        ("GPU peak MiB", lambda k, r: _mib(r.get("peak_bytes")), True),
        ("launches", launches, True),
        ("bandwidth", lambda k, r: _bandwidth(r), True),
        ("notes", lambda k, r: _notes(r) or None, False),
    ]


def _cell(text: Optional[str]) -> str:
    if text is None:
        return ""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def markdown_table(table: Dict[Key, Row], all_columns: bool = False) -> str:
    keys = sorted(table, key=sort_key)
    columns = _columns(table)
    cells = [[fn(key, table[key]) for _, fn, _ in columns] for key in keys]
    keep = [
        i
        for i, (_, _, optional) in enumerate(columns)
        if all_columns or not optional or any(row[i] is not None for row in cells)
    ]
    right = {"median ms", "min-max ms", "speedup vs reference", "graph MiB", "GPU peak MiB", "launches", "bandwidth"}
    header = [columns[i][0] for i in keep]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h in right else "---" for h in header) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(_cell(row[i]) for i in keep) + " |")
    return "\n".join(lines)


def provenance(table: Dict[Key, Row]) -> str:
    """One line per device: the software and the dates its rows come from."""
    by_device: Dict[str, List[Row]] = {}
    for key, row in table.items():
        by_device.setdefault(key[0], []).append(row)
    lines = []
    for device in sorted(by_device):
        rows = by_device[device]

        def values(field):
            return sorted({str(r.get(field)) for r in rows if r.get(field) not in (None, "")})

        parts = []
        for label, field in (("torch", "torch"), ("triton", "triton"), ("pynas", "pynas"), ("git", "git_sha"), ("threads", "threads")):
            found = values(field)
            if found:
                parts.append(f"{label} {', '.join(v[:10] if field == 'git_sha' else v for v in found)}")
        dates = sorted(d.date().isoformat() for d in (_parse_date(r.get("date")) for r in rows) if d)
        if dates:
            parts.append(f"measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
        lines.append(f"{device}: " + "; ".join(parts))
    return "\n".join(lines)


def render(table: Dict[Key, Row], all_columns: bool = False) -> str:
    text = markdown_table(table, all_columns)
    prov = provenance(table)
    if prov:
        text += "\n\n" + "<br>\n".join(f"<sub>{_cell(line)}</sub>" for line in prov.splitlines())
    return text


# ----------------------------------------------------------------------------- README


class ReadmeError(RuntimeError):
    pass


def replace_between_markers(text: str, body: str, begin: str = BEGIN_MARKER, end: str = END_MARKER) -> str:
    """``text`` with everything between the begin and end markers replaced by ``body``."""
    n_begin, n_end = text.count(begin), text.count(end)
    if n_begin == 0 or n_end == 0:
        missing = [m for m, n in ((begin, n_begin), (end, n_end)) if n == 0]
        raise ReadmeError(
            f"marker{'s' if len(missing) > 1 else ''} {' and '.join(missing)} not found; "
            f"add the lines {begin} and {end} where the table belongs"
        )
    if n_begin > 1 or n_end > 1:
        raise ReadmeError(f"markers must appear once each (found {begin} x{n_begin}, {end} x{n_end})")
    start, stop = text.index(begin), text.index(end)
    if stop < start:
        raise ReadmeError(f"{end} comes before {begin}")
    return text[: start + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[stop:]


def update_readme(path: str, body: str) -> bool:
    """Rewrite the table in ``path`` (atomically); returns whether the file changed."""
    with open(path, encoding="utf-8") as fh:
        old = fh.read()
    new = replace_between_markers(old, body)
    if new == old:
        return False
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


# ----------------------------------------------------------------------------- plot


def plot(table: Dict[Key, Row], path: str) -> bool:
    """Write the speedup chart to ``path``; returns False (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(
            f"report: matplotlib is not installed ({exc}); plot {path} skipped "
            '(pip install matplotlib, or pip install ".[bench]")',
            file=sys.stderr,
        )
        return False

    groups: Dict[Tuple[str, str, str], List[Key]] = {}
    for key in sorted(table, key=sort_key):
        if key[3] != "reference":
            groups.setdefault(key[:3], []).append(key)
    providers = sorted({key[3] for keys in groups.values() for key in keys}, key=provider_rank)
    cmap = plt.get_cmap("tab10")
    colors = {p: cmap(i % 10) for i, p in enumerate(providers)}

    bar_h, gap = 0.8, 0.7
    y = 0.0
    ticks, tick_labels = [], []
    bars = []  # (y, key, speedup or None)
    for group, keys in groups.items():
        top = y
        for key in keys:
            bars.append((y, key, speedup_of(key, table)))
            y += 1.0
        ticks.append((top + y - 1.0) / 2.0)
        device, benchmark, size = group
        tick_labels.append(f"{benchmark}\n{size}\n{device}")
        y += gap

    height = max(2.5, 0.38 * len(bars) + 0.45 * len(groups) + 1.6)
    fig, ax = plt.subplots(figsize=(11, height))
    values = [s for _, _, s in bars if s is not None]
    xmax = max(values + [1.0]) * 1.18
    for yy, key, value in bars:
        if value is None:
            row = table[key]
            status = str(row.get("status") or "ok")
            ax.text(0.02 * xmax, yy, f"{key[3]}: {status if status != 'ok' else 'no speedup'}", va="center", fontsize=8, color="0.35")
            continue
        ax.barh(yy, value, height=bar_h, color=colors[key[3]])
        ax.text(value + 0.01 * xmax, yy, f"{value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="0.2", linestyle="--", linewidth=1)
    ax.set_yticks(ticks)
    ax.set_yticklabels(tick_labels, fontsize=8)
    ax.set_ylim(y - gap + 0.2 if bars else 1, -0.8)  # first group at the top
    ax.set_xlim(0, xmax)
    ax.set_xlabel("speedup over the PyTorch reference (reference median / provider median; higher is better)")
    ax.set_title("pynas benchmarks: speedup over the reference (dashed line = 1.0)")
    ax.grid(axis="x", alpha=0.3)
    if not bars:
        ax.text(0.5, 0.5, "no rows other than the reference", transform=ax.transAxes, ha="center")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    if handles:
        ax.legend(handles, providers, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="provider", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def default_paths() -> List[str]:
    return sorted(glob.glob(str(RESULTS_DIR / "*.jsonl")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="*", metavar="FILE.jsonl", help=f"result files (default: {RESULTS_DIR}/*.jsonl)"
    )
    parser.add_argument("--readme", metavar="FILE", help="replace the table between the perf-table markers in FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG of the speedups (needs matplotlib)")
    parser.add_argument("--all-columns", action="store_true", help="keep optional columns even when empty")
    args = parser.parse_args(argv)

    paths = list(args.paths) or default_paths()
    if not paths:
        print(f"report: no result files given and none in {RESULTS_DIR}", file=sys.stderr)
        return 1
    table = newest(read_rows(paths))
    if not table:
        print(f"report: no result rows in {', '.join(paths)}", file=sys.stderr)
        return 1

    body = render(table, args.all_columns)
    print(body)

    status = 0
    if args.readme:
        try:
            changed = update_readme(args.readme, body)
        except (OSError, ReadmeError) as exc:
            print(f"report: cannot update {args.readme}: {exc}", file=sys.stderr)
            status = 1
        else:
            print(f"report: {args.readme} {'updated' if changed else 'already up to date'}", file=sys.stderr)
    if args.plot:
        if plot(table, args.plot):
            print(f"report: wrote {args.plot}", file=sys.stderr)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `report.py | head`
        sys.stderr.close()
        sys.exit(0)
