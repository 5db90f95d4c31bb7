"""Summary table and throughput figures from the benchmarks' JSON records.

    python benchmark/plot.py benchmark/results/attention.jsonl --out_dir benchmark/results/plots

Records are grouped by shape (card, nheads, kv_heads, head_dim, batch, seq_len, fwd_only); for a
configuration measured more than once the last record counts. Per group the table gives every
"ours" configuration's time, its share of the perfect-scaling limit (one-GPU time / world, with the
FA4 kernel when measured, else the fastest one measured), its speedup over torch CP and its peak
memory relative to torch CP; failures are listed at the end. The figures, one per group, draw
iterations per second of every (ring x ulysses) split and layout as grouped bars, like the
reference's, with the perfect-scaling limits and torch CP as horizontal lines.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GROUP_FIELDS = ("card", "nheads", "kv_heads", "head_dim", "batch_size", "seq_len", "fwd_only")


def group_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in GROUP_FIELDS)


def config_key(r: dict) -> tuple:
    if r["name"] == "ours":
        return ("ours", r.get("ulysses"), r.get("ring"), r.get("layout"), r.get("backend"), r.get("head_groups"),
                r.get("transport"), r.get("input"))
    if r["name"] == "torch_cp":
        return ("torch_cp", r.get("sdpa_backend"), r.get("rotate"))
    return (r["name"], r.get("backend"))


def organize(records):
    """({group: {config: latest record}}, failures). Later records replace earlier ones."""
    groups: dict[tuple, dict[tuple, dict]] = {}
    for r in records:
        if r.get("launch_failure"):
            continue
        groups.setdefault(group_key(r), {})[config_key(r)] = r
    failures = [r for r in records if r.get("launch_failure")]
    failures += [r for g in groups.values() for r in g.values() if r.get("error")]
    ok = {k: {c: r for c, r in g.items() if not r.get("error")} for k, g in groups.items()}
    return {k: g for k, g in ok.items() if g}, failures


def group_title(key: tuple) -> str:
    card, h, kv, d, b, s, fwd = key
    return f"h{h}/kv{kv} d{d} b{b} S={s} {'fwd' if fwd else 'fwd+bwd'} on {card}"


def references(group: dict):
    """(single-GPU records by kernel, the kernel of the perfect-scaling line, the torch CP record)."""
    single = {r["kernel"]: r for r in group.values() if r["name"] == "single_gpu"}
    ref_kernel = "fa4" if "fa4" in single else min(single, key=lambda k: single[k]["time_ms"], default=None)
    cps = [r for r in group.values() if r["name"] == "torch_cp"]
    preferred = [r for r in cps if r.get("sdpa_backend") == "cudnn" and r.get("rotate") == "allgather"]
    cp = (preferred or sorted(cps, key=lambda r: r["time_ms"]) or [None])[0]
    return single, ref_kernel, cp


def ours_sorted(group: dict) -> list[dict]:
    rows = [r for r in group.values() if r["name"] == "ours"]
    return sorted(rows, key=lambda r: (-r["ring"], r["ulysses"], r["layout"] or "", r["kernel"] or "",
                                       r.get("head_groups") or 1, r.get("transport") or "", r.get("input") or ""))


def series_name(r) -> str:
    groups = r.get("head_groups") or 1
    transport = r.get("transport") or "nccl"
    separate_mha = r.get("input") == "q,k,v" and r.get("kv_heads") == r.get("nheads")  # --separate_qkv
    return (f"{r['layout']} / {r['kernel']}" + (f" / {groups} head groups" if groups > 1 else "")
            + (f" / {transport}" if transport != "nccl" else "") + (" / q,k,v" if separate_mha else ""))


def _ratio(a, b, fmt):
    return fmt.format(a / b) if a is not None and b else "-"


def summary(records) -> str:
    groups, failures = organize(records)
    lines = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        group = groups[key]
        single, ref_kernel, cp = references(group)
        lines.append(f"== {group_title(key)}")
        refs = [f"single {k} {r['time_ms']:.1f} ms ({r['tflops_per_gpu']:.0f} TF/s)" for k, r in sorted(single.items())]
        if cp is not None:
            mem = f", {cp['peak_mem_gib']:.2f} GiB" if cp.get("peak_mem_gib") is not None else ""
            refs.append(f"torch_cp {cp['sdpa_backend']}/{cp['rotate']} {cp['time_ms']:.1f} ms{mem}")
        lines.append("   " + (" | ".join(refs) or "no single-GPU or torch CP reference"))
        if cp is not None and (cp.get("sdpa_patched") is False or (
                ref_kernel and cp["time_ms"] < 0.95 * single[ref_kernel]["time_ms"] / cp["world"])):
            lines.append("   ! torch CP beats perfect scaling or did not patch SDPA: it may not be running its ring")
        rows = ours_sorted(group)
        if rows:
            lines.append(f"   {'ours':44s} {'ms':>9s} {'TF/s/GPU':>8s} {'%perf-' + (ref_kernel or '?'):>10s} "
                         f"{'vs CP':>6s} {'GiB':>6s} {'mem/CP':>6s}")
        for r in rows:
            perfect = single[ref_kernel]["time_ms"] / r["world"] if ref_kernel else None
            label = f"u{r['ulysses']}xr{r['ring']} {series_name(r)}"
            mem = r.get("peak_mem_gib")
            lines.append(
                f"   {label:44s} {r['time_ms']:9.2f} {r['tflops_per_gpu']:8.1f} "
                f"{_ratio(perfect, r['time_ms'] / 100, '{:9.1f}%'):>10s} "
                f"{_ratio(cp and cp['time_ms'], r['time_ms'], '{:5.2f}x'):>6s} "
                f"{'-' if mem is None else f'{mem:.2f}':>6s} "
                f"{_ratio(mem, cp and cp.get('peak_mem_gib'), '{:5.2f}x'):>6s}")
            inter = r.get("interleaved") or {}
            if inter.get("perfect_ms"):  # --interleave: a baseline from the same launch
                lines.append(f"     same launch, one-GPU {inter['baseline_kernel']} / {r['world']} = {inter['perfect_ms']:.2f} ms: "
                             f"{100 * inter['perfect_ms'] / r['time_ms']:.1f}% sustained (timed median), "
                             f"{inter['perfect_pct']:.1f}% interleaved ({inter['ours_ms']:.2f} ms)")
            prof = r.get("profile") or {}
            if prof.get("window_ms"):
                lines.append(f"     profile/iter: window {prof['window_ms']:.1f} ms, compute busy "
                             f"{prof['compute_busy_pct']:.1f}%, exposed comm {prof['exposed_comm_ms']:.2f} ms, "
                             f"idle {prof['idle_ms']:.2f} ms, copies {prof['copy_ms']:.2f} ms")
    if failures:  # the same error once, with how many configurations hit it and the first of them
        lines.append(f"== {len(failures)} failed configuration(s)/launch(es)")
        by_error: dict[str, list[dict]] = {}
        for r in failures:
            by_error.setdefault(r["error"].splitlines()[0][:240], []).append(r)
        for error, rs in by_error.items():
            r = rs[0]
            where = (f"{r['name']} {r.get('config', '')} h{r.get('nheads')}/kv{r.get('kv_heads')} S={r.get('seq_len')} "
                     f"{'fwd' if r.get('fwd_only') else 'fwd+bwd'}")
            more = f" (+{len(rs) - 1} more)" if len(rs) > 1 else ""
            lines.append(f"   {len(rs)}x {error}\n      first: {where}{more}")
            if r.get("launch_failure"):
                lines.append(f"      command: {r['command'][:300]}")
    return "\n".join(lines)


def plot(records, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    groups, _ = organize(records)
    paths = []
    for key, group in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        rows = ours_sorted(group)
        single, _, cp = references(group)
        if not rows and not single:
            continue
        splits = list(dict.fromkeys(f"{r['ring']}x{r['ulysses']}" for r in rows))
        series = list(dict.fromkeys(series_name(r) for r in rows))
        colors = {name: f"C{i % 10}" for i, name in enumerate(series)}
        fig, ax = plt.subplots(figsize=(7 + 0.5 * len(rows), 4.5))
        width = 0.8 / max([1] + [sum(f"{r['ring']}x{r['ulysses']}" == sp for r in rows) for sp in splits])
        labelled = set()
        for j, split in enumerate(splits):  # the bars of one split side by side, centred on its tick
            here = [r for r in rows if f"{r['ring']}x{r['ulysses']}" == split]
            for i, r in enumerate(here):
                name = series_name(r)
                bar = ax.bar(j + (i - (len(here) - 1) / 2) * width, r["iters_per_s"], width, color=colors[name],
                             label=None if name in labelled else name)
                labelled.add(name)
                ax.bar_label(bar, fmt="%.2f", fontsize=7)
        world = rows[0]["world"] if rows else 2
        styles = iter(["--", "-.", ":", (0, (5, 1))])
        for kernel, r in sorted(single.items()):
            ax.axhline(world * r["iters_per_s"], color="black", linestyle=next(styles, "--"), linewidth=1,
                       label=f"perfect scaling x{world} ({kernel}, one GPU {r['iters_per_s']:.2f} it/s)")
        if cp is not None:
            ax.axhline(cp["iters_per_s"], color="tab:red", linewidth=1.5,
                       label=f"torch CP ({cp['sdpa_backend']}, {cp['rotate']})")
        ax.set_xticks(range(len(splits)), splits)
        ax.set_xlabel("ring degree x ulysses degree")
        ax.set_ylabel("iterations / s")
        dates = sorted({str(r.get("date", ""))[:10] for r in group.values()})
        ax.set_title(f"{group_title(key)}\n{', '.join(dates)}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        card, h, kv, d, b, s, fwd = key
        path = os.path.join(out_dir, f"throughput_h{h}_kv{kv}_d{d}_b{b}_s{s}_{'fwd' if fwd else 'fwdbwd'}"
                                     f"_{str(card).replace(' ', '_')}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSON-lines files or directories of *.jsonl")
    p.add_argument("--out_dir", default=None, help="where the PNGs go (default: a plots/ folder next to the first input)")
    p.add_argument("--no_plots", action="store_true", help="print the summary only")
    args = p.parse_args(argv)
    records = common.load_records(args.inputs)
    if not args.no_plots:
        first = args.inputs[0]
        out_dir = args.out_dir or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "plots")
        try:
            paths = plot(records, out_dir)
            print(f"{len(paths)} figure(s) in {out_dir}")
        except ImportError as exc:
            print(f"no figures ({exc}); pip install matplotlib")
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
