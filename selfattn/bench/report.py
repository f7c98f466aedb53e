"""The report: a markdown table per (case, level), summary tables across cases (one generic
builder), and a PNG plot of the FLOP rates."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .cases import DTYPES, GIB, MASKS_LEVEL, MEMORY_MODES, MIB, Case, case_title
from .records import Failed, Group, Measured, Record, Result, Skipped, Speedup, Timed, Unavailable
from .variants import COMPARISONS


def num(x: float) -> str:
    """3 significant digits, without exponents: 0.0412, 4.12, 41.2, 412, 4120."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def fmt_memory(entry) -> str:
    if isinstance(entry, Measured):
        return fmt_bytes(entry.peak_bytes)
    if isinstance(entry, Skipped):
        return f"skipped ({entry.reason})"
    if isinstance(entry, Failed):
        return f"error: {entry.error}"
    return entry.status if entry else "—"  # unavailable: the reason is under the table


def fmt_ms(entry: Timed) -> str:
    return f"{num(entry.median_ms)} ({num(entry.min_ms)}–{num(entry.max_ms)})"


def fmt_ratio(speedup: Optional[Speedup]) -> str:
    if not speedup:
        return "—"
    return f"{speedup.median:.2f}× ({speedup.min:.2f}–{speedup.max:.2f})"


def _mode_cells(entry, flop_scale: float) -> List[str]:
    if entry is None:
        return ["not timed", "", "", ""]
    if isinstance(entry, Skipped):
        return [f"skipped ({entry.reason})", "—", "—", "—"]
    if not isinstance(entry, Timed):  # unavailable: the reason, often long, goes under the table
        return [entry.status, "—", "—", "—"]
    return [fmt_ms(entry), num(entry.flop_rate / flop_scale), f"{entry.pct_gemm:.0f}%", fmt_ratio(entry.speedup)]


def _impl_label(record: Record) -> str:
    """The name, † when it has a note, and the SDPA backend(s) it used."""
    label = record.impl + (" †" if record.note else "")
    backends = " / ".join(dict.fromkeys(e.backend for e in record.modes.values() if isinstance(e, Timed) and e.backend))
    return f"{label} [{backends}]" if backends else label


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def case_table(records: List[Record], groups: List[Group], modes: Sequence[str], flop_unit: str,
               flop_scale: float) -> List[str]:
    """Every implementation of one (case, level): times, rates, speedups, peak memory."""
    head = ["impl"]
    for mode in modes:
        head += [f"{mode} ms (min–max)", flop_unit, "% GEMM", "selfattn speedup (min–max)"]
    head += [f"peak {m}" for m in MEMORY_MODES]
    rows = []
    for record in records:
        cells = [_impl_label(record)]
        for mode in modes:
            cells += _mode_cells(record.modes.get(mode), flop_scale)
        rows.append(cells + [fmt_memory(record.memory.get(m)) for m in MEMORY_MODES])
    lines = _table(head, rows) + [""]
    for record in records:
        reasons = dict.fromkeys(e.reason for e in record.modes.values() if isinstance(e, Unavailable))
        lines += [f"- {record.impl} unavailable: {reason}" for reason in reasons]
    lines += [f"- {g.mode}: {g.gemm} at {num(g.gemm_flop_rate / flop_scale)} {flop_unit} in the same "
              f"rounds; {g.repeats} rounds, {g.input_sets} input sets rotated." for g in groups]
    return lines


# ---------------------------------------------------------------------------------------------
# Summaries: one line per case, a column per implementation, each cell its values for several
# modes joined by " / " ("skip": estimated over the budget; "—": nothing to show).

CASE_HEAD = ["(B, N, E, H)", "dtype", "causal"]
Column = Tuple[str, Callable[[Case, Dict[str, Record]], str]]  # (head, cell of a case's records by impl)


def _by_case(records: List[Record], level: str) -> Dict[Case, Dict[str, Record]]:
    """{case: {impl: record}} for one level, in run order."""
    by_case: Dict[Case, Dict[str, Record]] = {}
    for r in records:
        if r.level == level:
            by_case.setdefault(r.case, {})[r.impl] = r
    return by_case


def _impl_names(by_case: Dict[Case, Dict[str, Record]]) -> List[str]:
    return list(dict.fromkeys(name for by_impl in by_case.values() for name in by_impl))


def _case_cells(case: Case) -> List[str]:
    return [case.shape.label(), case.dtype, "yes" if case.causal else "no"]


def summary_table(records: List[Record], level: str, columns: Sequence[Column], timed_only: bool) -> List[str]:
    """One line per case of the level (timed_only: memory points left out): its cells, then the columns'."""
    variant = level == MASKS_LEVEL
    rows = [[case.variant] * variant + _case_cells(case) + [cell(case, by_impl) for _, cell in columns]
            for case, by_impl in _by_case(records, level).items() if case.shape.timed or not timed_only]
    return _table(["variant"] * variant + CASE_HEAD + [head for head, _ in columns], rows)


def per_mode(name: str, modes: Sequence[str], memory: bool,
             show: Callable[[object], Optional[str]]) -> Callable[[Case, Dict[str, Record]], str]:
    """A cell: implementation `name`'s timing (or memory) entries over `modes`, each shown by `show`
    when it ran; "skip" when skipped, "—" when `show` gives None or there is nothing."""

    def cell(case: Case, by_impl: Dict[str, Record]) -> str:
        record = by_impl.get(name)
        entries = (record.memory if memory else record.modes) if record else {}
        shown = []
        for mode in modes:
            entry = entries.get(mode)
            ran = isinstance(entry, (Measured if memory else Timed))
            text = show(entry) if ran else ("skip" if isinstance(entry, Skipped) else None)
            shown.append(text or "—")
        return " / ".join(shown)

    return cell


def speedup_summary(records: List[Record], level: str, modes: Sequence[str]) -> List[str]:
    """selfattn's time and its speedup over each other implementation."""
    others = [name for name in _impl_names(_by_case(records, level)) if name != "selfattn"]
    columns = [(f"selfattn ms {' / '.join(modes)}", per_mode("selfattn", modes, False, lambda e: num(e.median_ms)))]
    columns += [(f"vs {name}", per_mode(name, modes, False, lambda e: e.speedup and f"{e.speedup.median:.2f}×"))
                for name in others]
    return summary_table(records, level, columns, timed_only=True)


def rate_summary(records: List[Record], level: str, modes: Sequence[str], flop_scale: float) -> List[str]:
    """Every implementation's FLOP rate (the package docstring's count)."""
    columns = [("D", lambda case, _: str(case.shape.head_dim))]
    columns += [(name, per_mode(name, modes, False, lambda e: num(e.flop_rate / flop_scale)))
                for name in _impl_names(_by_case(records, level))]
    return summary_table(records, level, columns, timed_only=True)


def memory_summary(records: List[Record], level: str) -> List[str]:
    """Each implementation's peak memory, fwd / fwd+bwd."""
    columns = [(name, per_mode(name, MEMORY_MODES, True, lambda e: fmt_bytes(e.peak_bytes)))
               for name in _impl_names(_by_case(records, level))]
    return summary_table(records, level, columns, timed_only=False)


def round_ratios(ours: Timed, theirs: Timed, at_most: bool) -> Speedup:
    """The per-round ratios in a target's direction: t_selfattn / t_row (at_most) or t_row / t_selfattn."""
    ratios = [(a / b if at_most else b / a) for a, b in zip(ours.times_ms, theirs.times_ms)]
    return Speedup(statistics.median(ratios), min(ratios), max(ratios))


def masks_summary(records: List[Record], modes: Sequence[str]) -> List[str]:
    """Per variant: selfattn's time, and per comparison row and mode its ratio in the direction of
    the variant's target (median (min–max) of the per-round ratios; ✓ / ✗ against the target)."""
    by_case = _by_case(records, MASKS_LEVEL)
    comparisons = [c for c in COMPARISONS if any(c[0] in by_impl for by_impl in by_case.values())]
    head = ["variant", "(B, Hq, N, D)", "Hk", "causal"] + [f"selfattn ms {mode}" for mode in modes]
    for _, _, title in comparisons:
        head += [f"{title} {mode}" for mode in modes] + ["target"]
    rows, notes = [], {}
    for case, by_impl in by_case.items():
        ours = by_impl["selfattn"].modes
        notes.update({f"- {case.variant}: {e.reason}": None for record in by_impl.values()
                      for e in record.modes.values() if isinstance(e, Unavailable)})
        s = case.shape
        row = [case.variant, f"({s.batch}, {s.heads}, {s.seq}, {s.head_dim})", str(case.kv_heads),
               "yes" if case.causal else "no"]
        row += [fmt_ms(ours[m]) if isinstance(ours.get(m), Timed) else _mode_cells(ours.get(m), 1)[0] for m in modes]
        for name, at_most, _ in comparisons:
            target = case.variant_spec.target(name)
            for mode in modes:
                theirs = by_impl[name].modes.get(mode) if name in by_impl else None
                if not (isinstance(ours.get(mode), Timed) and isinstance(theirs, Timed)):
                    row.append("—")
                    continue
                ratio = round_ratios(ours[mode], theirs, at_most)
                mark = "" if target is None else (" ✓" if target.met(ratio.median) else " ✗")
                row.append(fmt_ratio(ratio) + mark)
            row.append(target.text() if target else "—")
        rows.append(row)
    return _table(head, rows) + ([""] + list(notes) if notes else [])


def _masks_notes() -> List[str]:
    return ["- Masks: each variant's rows run interleaved in the same rounds: selfattn with the variant, "
            "selfattn plain (the same shape without it; GQA: k, v repeated to Hq beforehand, untimed), SDPA "
            "given the same inputs (varlen: the padded batch with the padding mask), and for varlen selfattn "
            "once per sequence. Masks and lengths come from a fixed seed and are built once, untimed.",
            "- Masks FLOPs: 4·D per visible (query, key) pair forward, 2.5× that backward, the pairs counted "
            "exactly for each row's own problem: padding N·Σn_b per head (padded query rows included), varlen "
            "Σn_s², the window its band's pairs (causal: N(N+1)/2 without the window), the random mask its True "
            "count (all its tiles are computed: the rate shows the useful half).",
            "- Masks summary: own and separate: t_selfattn / t_row (< 1: the variant saves time; target ≤), "
            "SDPA: t_sdpa / t_selfattn (> 1: selfattn faster; target ≥); median (min–max) of the per-round "
            "ratios, ✓ / ✗ against the target."]


def markdown_report(result: Result, modes: Sequence[str]) -> str:
    meta, records = result.meta, result.records
    out = [f"# selfattn benchmark — {meta.device}",
           "",
           f"torch {meta.torch}; {meta.selfattn_build}; {meta.repeats} interleaved rounds per timing; "
           f"memory budget {fmt_bytes(meta.memory_budget_bytes)}; {meta.wall_s:.0f} s wall.",
           "",
           "- Times: median (min–max) per call. selfattn speedup: median (min–max) of the per-round ratios "
           "t_impl / t_selfattn (> 1: selfattn faster).",
           f"- Peak: memory growth above inputs and parameters ({meta.memory_method}).",
           f"- % GEMM: of the {meta.gemm_note}.",
           "- † nn.MultiheadAttention also runs its output projection (+2·B·N·M·E FLOP forward, counted in its "
           "rate). Causal, it is called as documented, attn_mask = the causal mask with is_causal=True; it "
           "converts that mask to N² elements of the dtype.",
           "- Causal FLOPs are half the full count for everyone (eager and reference compute all scores, then mask).",
           ""]
    if MASKS_LEVEL in meta.levels:
        out[-1:] = _masks_notes() + [""]
    if meta.note:
        out += [f"Sweep: {meta.note}.", ""]
    for level in meta.levels:
        for case, by_impl in _by_case(records, level).items():
            groups = [g for g in result.groups if g.level == level and g.case == case]
            out += [f"## {case_title(case, level)}", ""]
            out += case_table(list(by_impl.values()), groups, modes, meta.flop_unit, meta.flop_scale) + [""]
    if any(r.memory for r in records):
        out += [f"## Summary: peak memory, {' / '.join(MEMORY_MODES)} (skip: estimated over the budget)", ""]
        for level in meta.levels:
            out += [f"### {level}", ""] + memory_summary(records, level) + [""]
    plain_levels = [level for level in meta.levels if level != MASKS_LEVEL]  # masks: its own summary, last
    if plain_levels:
        out += [f"## Summary: selfattn ms and speedup, {' / '.join(modes)} (> 1: selfattn faster)", ""]
    for level in plain_levels:
        out += [f"### {level}", ""] + speedup_summary(records, level, modes) + [""]
    # Last: the compact table a log's tail shows (scripts/gpu_check.sh keeps it).
    out += [f"## Summary: {meta.flop_unit} of every implementation, {' / '.join(modes)}", ""]
    for level in meta.levels:
        out += [f"### {level}", ""] + rate_summary(records, level, modes, meta.flop_scale) + [""]
    if MASKS_LEVEL in meta.levels:
        out += ["## Summary: masked variants — selfattn against itself without the variant and against SDPA", ""]
        out += masks_summary(records, modes) + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plot


def write_plot(result: Result, path: Path, modes: Sequence[str]) -> Optional[str]:
    """Bars of each implementation's FLOP rate per case, one panel per (level, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the 'bench' extra): no plot"
    levels = result.meta.levels
    width = max(7.0, 0.12 * len(result.records))  # about 0.6 inch per case and level
    fig, axes = plt.subplots(len(levels), len(modes), figsize=(width * len(modes), 4.5 * len(levels)), squeeze=False)
    fig.suptitle(f"{result.meta.device} — x: B×N, E/H, dtype, c = causal", fontsize=9)
    for row, level in enumerate(levels):
        for col, mode in enumerate(modes):
            _plot_panel(axes[row][col], result, level, mode)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _short_label(case: Case) -> str:
    s = case.shape
    return f"{s.batch}×{s.seq}\n{s.embed}/{s.heads}\n{DTYPES[case.dtype]}{' c' if case.causal else ''}"


def _plot_panel(ax, result: Result, level: str, mode: str) -> None:
    by_case = {case: by_impl for case, by_impl in _by_case(result.records, level).items()
               if any(isinstance(r.modes.get(mode), Timed) for r in by_impl.values())}
    names = _impl_names(by_case)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        entries = [by_impl[name].modes.get(mode) if name in by_impl else None for by_impl in by_case.values()]
        values = [e.flop_rate / result.meta.flop_scale if isinstance(e, Timed) else 0.0 for e in entries]
        ax.bar([x + i * width for x in range(len(by_case))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(by_case))], [_short_label(c) for c in by_case], fontsize=7)
    ax.set_ylabel(result.meta.flop_unit)
    ax.set_title(f"{level}, {mode}")
    ax.legend(fontsize=7)
