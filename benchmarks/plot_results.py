"""Plot the committed GPU benchmark results in benchmarks/results/ as PNG files next to them.

    python benchmarks/plot_results.py [--results DIR] [--date 2026-11-29] [--machine "NVIDIA H200"]

Reads the raw JSON files written by the benchmark scripts (names `<benchmark>-h200-<date>[-variant].json`, see
benchmarks/results/README.md) and writes, for the given date:
  sparse-decode-h200-<date>.png         one decode step (batch 64 x 32K context): sparse vs dense, per kernel
  sparse-decode-h200-<date>-shapes.png  sparse vs dense decode over the measured batch/context shapes
  flash-h2d-h200-<date>.png             FlashH2D GB/s vs page size and vs num_sms, with the baselines
  flash-d2h-h200-<date>.png             FlashD2H GB/s per token count, with the baselines; interference
  e2e-smoke-h200-<date>.png             vLLM end-to-end smoke: decode ms/step and prefill s per engine
  page-cache-h200-<date>.png            PageCache.resolve throughput vs an OrderedDict LRU
  offload-h200-<date>.png               offload decode step and batch control on/off
  segmented-prefill-h200-<date>.png     layer-segmented prefill: prompt alone (128K, 32K) and TTFT under load
  set10-h200-2026-11-30.png             offload step before/after, gqa_reduce cost, batch control, serving (11-30)
  accuracy-smollm2-cpu.png              pass-key hits and attention-output error per selector, budget, gqa_reduce
A plot whose input file is missing is skipped with a message. Only matplotlib and the standard library are used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HBM_TBPS = 4.8
GOAL_DECODE_SPEEDUP = 5.0
GOAL_HBM_FRACTION = 0.6
GOAL_COPY_RATIO = 0.9


def load(results: Path, name: str) -> dict | None:
    path = results / name
    if not path.exists():
        print(f"skip: {path} not found")
        return None
    return json.loads(path.read_text())


def label_bars(ax, bars, fmt: str, fontsize: int = 8) -> None:
    for b in bars:
        h = b.get_height()
        ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=fontsize)


def finish_axis(ax, labels, ylabel: str, title: str, fontsize: int = 8, rotation: int = 0) -> None:
    """Tick labels for bars at 0..n-1, the y label, the legend and the title."""
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=fontsize, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)


def save(fig, out: Path, bottom: float = 0.0) -> None:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"wrote {out}")


# ---- (a) sparse decode step ---------------------------------------------------------------------------------------
def plot_decode(results: Path, tag: str, title_suffix: str) -> None:
    d = load(results, f"sparse-decode-{tag}.json")
    if d is None:
        return
    c, t, dense = d["config"], d["times_us"], d["dense_baselines"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.25]})

    names = ["SparseServe step\n(score+select+attend)", "dense vLLM FA3\n(flash_attn_varlen_func)",
             "dense Triton kernel\nover all pages"]
    vals = [t["wrapper_run"], dense.get("vllm_fa3", {}).get("us"), dense["triton_all_pages"]["us"]]
    keep = [(n, v) for n, v in zip(names, vals) if v is not None]
    colors = ["tab:green", "tab:red", "tab:gray"][: len(keep)]
    bars = ax1.bar([n for n, _ in keep], [v for _, v in keep], color=colors)
    label_bars(ax1, bars, "{:.0f} us", 9)
    for b, (n, v) in zip(bars[1:], keep[1:]):
        ax1.annotate(f"sparse step\n{v / t['wrapper_run']:.2f}x faster", (b.get_x() + b.get_width() / 2, v / 2),
                     ha="center", fontsize=8, color="white", fontweight="bold")
    fa3_us = dense.get("vllm_fa3", {}).get("us")
    if fa3_us is not None:
        ax1.axhline(fa3_us / GOAL_DECODE_SPEEDUP, color="black", ls="--", lw=1)
        ax1.annotate(f"goal: {GOAL_DECODE_SPEEDUP:.0f}x FA3\n= {fa3_us / GOAL_DECODE_SPEEDUP:.0f} us",
                     (0.01, fa3_us / GOAL_DECODE_SPEEDUP), xycoords=("axes fraction", "data"), xytext=(0, 3),
                     textcoords="offset points", ha="left", fontsize=8)
    ax1.set_ylabel("time per decode call, one layer (microseconds)")
    ax1.set_title(f"Decode attention, batch {c['batch']} x {c['context'] // 1024}K context, budget {c['budget']} "
                  f"tokens\n(Hq {c['num_heads']}, Hkv {c['num_kv_heads']}, D {c['head_dim']}, bf16, "
                  f"{c['selector']}, CUDA-graph timed)", fontsize=9)
    ax1.tick_params(axis="x", labelsize=8)

    bw = d["bandwidth_fraction_of_4.8TBps"]
    parts = [("score_pages", "score pages (all full pages' metadata)", bw.get("score_pages")),
             ("select_pages_fused_slots", "select top pages + slots", None),
             ("sparse_attention", f"attention over selected pages (splits={c['num_splits']})",
              bw.get("sparse_attention"))]
    labels, values, fracs = [], [], []
    for key, lab, fr in parts:
        labels.append(lab)
        values.append(t[key])
        fracs.append(fr)
    labels += ["sum of the three kernels alone", "SparseDecodeWrapper.run (one call)",
               f"build_page_metadata, {c['batch'] * c['num_kv_heads']} pages\n(not in the step; worst case per step)"]
    values += [sum(t[k] for k, _, _ in parts), t["wrapper_run"], t["build_page_metadata_B_x_Hkv_pages"]]
    fracs += [None, bw.get("wrapper_run"), None]
    colors2 = ["tab:blue", "tab:orange", "tab:purple", "lightgray", "tab:green", "tab:olive"]
    y = list(range(len(labels)))[::-1]
    ax2.barh(y, values, color=colors2)
    for yi, v, fr in zip(y, values, fracs):
        txt = f"{v:.1f} us" + (f"  ({fr * 100:.0f}% of {HBM_TBPS} TB/s)" if fr is not None else "")
        ax2.annotate(txt, (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax2.set_yticks(y)
    ax2.set_yticklabels(labels, fontsize=8)
    ax2.set_xlabel("time per call (microseconds)")
    ax2.set_xlim(0, max(values) * 1.55)
    ax2.set_title("SparseServe step broken down by kernel (each timed alone)", fontsize=9)
    fig.suptitle(f"Sparse decode step vs dense decode: {title_suffix}", fontsize=11)
    save(fig, results / f"sparse-decode-{tag}.png")


def plot_decode_shapes(results: Path, tag: str, title_suffix: str) -> None:
    runs = [(f"sparse-decode-{tag}-b8-ctx32k.json", "batch 8\n32K ctx"),
            (f"sparse-decode-{tag}.json", "batch 64\n32K ctx"),
            (f"sparse-decode-{tag}-b16-ctx128k.json", "batch 16\n128K ctx")]
    rows = []
    for name, lab in runs:
        d = load(results, name)
        if d is not None:
            rows.append((lab, d))
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    xs = range(len(rows))
    w = 0.27
    sparse = [d["times_us"]["wrapper_run"] for _, d in rows]
    triton = [d["dense_baselines"]["triton_all_pages"]["us"] for _, d in rows]
    fa3 = [d["dense_baselines"].get("vllm_fa3", {}).get("us") for _, d in rows]
    b1 = ax1.bar([x - w for x in xs], sparse, w, color="tab:green", label="SparseServe step (budget 2048)")
    b2 = ax1.bar(list(xs), triton, w, color="tab:gray", label="dense Triton kernel over all pages")
    fa_x = [x + w for x, v in zip(xs, fa3) if v is not None]
    b3 = ax1.bar(fa_x, [v for v in fa3 if v is not None], w, color="tab:red", label="dense vLLM FA3")
    for bars in (b1, b2, b3):
        label_bars(ax1, bars, "{:.0f}", 8)
    for x, s, tr in zip(xs, sparse, triton):
        ax1.annotate(f"sparse {tr / s:.1f}x faster\nthan Triton dense", (x, max(tr, s) * 1.6), ha="center", fontsize=8)
    for x, v in zip(xs, fa3):
        if v is None:
            ax1.annotate("FA3 not\nmeasured\nat this\nshape", (x + w, 15), ha="center", fontsize=7, color="tab:red")
    ax1.set_yscale("log")
    ax1.set_ylim(10, max(triton) * 8)
    ax1.set_xlim(-0.6, len(rows) - 0.4)
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels([lab for lab, _ in rows])
    ax1.set_ylabel("time per decode call, one layer (microseconds, log scale)")
    ax1.set_title("Decode attention time by shape", fontsize=9)
    ax1.legend(fontsize=8, loc="upper left")

    frac = [d["bandwidth_fraction_of_4.8TBps"]["wrapper_run"] * 100 for _, d in rows]
    bb = ax2.bar(list(xs), frac, 0.5, color="tab:green")
    label_bars(ax2, bb, "{:.0f}%", 9)
    ax2.axhline(GOAL_HBM_FRACTION * 100, color="black", ls="--", lw=1)
    ax2.annotate(f"goal {GOAL_HBM_FRACTION * 100:.0f}%", (0.01, GOAL_HBM_FRACTION * 100 + 1),
                 xycoords=("axes fraction", "data"),
                 ha="left", fontsize=8)
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels([lab for lab, _ in rows])
    ax2.set_ylim(0, 100)
    ax2.set_ylabel(f"SparseServe step bytes / time, % of {HBM_TBPS} TB/s HBM")
    ax2.set_title("Achieved HBM bandwidth of the sparse step\n(metadata of all full pages + selected K/V + q/out)",
                  fontsize=9)
    fig.suptitle(f"Sparse vs dense decode attention by shape: {title_suffix}", fontsize=11)
    save(fig, results / f"sparse-decode-{tag}-shapes.png")


# ---- (b) FlashH2D -------------------------------------------------------------------------------------------------
def plot_h2d(results: Path, tag: str, title_suffix: str) -> None:
    d = load(results, f"flash-h2d-{tag}.json")
    if d is None:
        return
    cont = d["contiguous"]["gbps"]
    pages = sorted({r["page_kib"] for r in d["flash_h2d"]})
    tiles = sorted({r["tile_kib"] for r in d["flash_h2d"]})
    sms = sorted({r["num_sms"] for r in d["flash_h2d"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1.3, 1]})

    best = [max(r["gbps"] for r in d["flash_h2d"] if r["page_kib"] == p) for p in pages]
    worst = [min(r["gbps"] for r in d["flash_h2d"] if r["page_kib"] == p) for p in pages]
    default = [next((r["gbps"] for r in d["flash_h2d"] if r["page_kib"] == p and r["tile_kib"] == 32
                     and r["num_sms"] == d["sms"]), None) for p in pages]
    per_page = {r["page_kib"]: r["gbps"] for r in d["per_page_copy"]}
    series = [("flash_h2d, best of sweep", best, "tab:green"),
              (f"flash_h2d, default ({d['sms']} SMs, 32 KiB tile)", default, "tab:olive"),
              ("flash_h2d, worst of sweep", worst, "tab:brown"),
              ("one copy_ per page (baseline)", [per_page.get(p) for p in pages], "tab:red"),
              ("one contiguous copy (ceiling)", [cont] * len(pages), "dimgray")]
    w = 0.8 / len(series)
    for i, (lab, vals, col) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(pages))]
        bars = ax1.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], w,
                       color=col, label=lab)
        for b, v in zip(bars, [v for v in vals if v is not None]):
            txt = f"{v:.2f}" if i >= 3 else f"{v:.1f}\n{v / cont:.2f}x"
            ax1.annotate(txt, (b.get_x() + b.get_width() / 2, v), xytext=(0, 2), textcoords="offset points",
                         ha="center", va="bottom", fontsize=6.5)
    ax1.axhline(GOAL_COPY_RATIO * cont, color="black", ls="--", lw=1,
                label=f"goal {GOAL_COPY_RATIO}x contiguous = {GOAL_COPY_RATIO * cont:.1f} GB/s")
    ax1.set_xticks(range(len(pages)))
    ax1.set_xticklabels([f"{p} KiB pages\n({p * 1024 // 512} tokens)" for p in pages])
    ax1.set_yscale("log")
    ax1.set_ylim(0.2, 3000)
    ax1.set_xlabel("page size (one KV head, K+V, D=128, bf16)")
    ax1.set_ylabel("GB/s of page bytes delivered to HBM (log scale)")
    ax1.set_title(f"Gather of {d['gather_mib']} MiB of random pages from a {d['pool_gib']:.0f} GiB pinned pool "
                  f"(ratio = / contiguous)", fontsize=9)
    ax1.legend(fontsize=7, loc="upper left", ncol=2)

    colors = dict(zip(pages, ["tab:blue", "tab:orange", "tab:green", "tab:purple"]))
    styles = dict(zip(tiles, ["-", "--", ":", "-."]))
    for p in pages:
        for tk in tiles:
            pts = sorted((r["num_sms"], r["gbps"]) for r in d["flash_h2d"]
                         if r["page_kib"] == p and r["tile_kib"] == tk)
            ax2.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=colors[p], ls=styles[tk],
                     label=f"page {p} KiB, tile {tk} KiB")
    ax2.axhline(cont, color="black", lw=1.5)
    ax2.axhline(GOAL_COPY_RATIO * cont, color="black", ls="--", lw=1)
    ax2.annotate(f"contiguous {cont} GB/s", (sms[0], cont), xytext=(2, 3), textcoords="offset points", fontsize=8)
    ax2.annotate(f"goal {GOAL_COPY_RATIO}x = {GOAL_COPY_RATIO * cont:.1f} GB/s", (sms[-1], GOAL_COPY_RATIO * cont),
                 xytext=(-2, -10), textcoords="offset points", ha="right", fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sms)
    ax2.set_xticklabels([str(s) for s in sms])
    ax2.set_xlabel("num_sms (persistent programs of the gather kernel)")
    ax2.set_ylabel("GB/s of page bytes delivered to HBM")
    ax2.set_ylim(38, 58)
    ax2.set_title("flash_h2d throughput vs SMs used, by page and tile size", fontsize=9)
    ax2.legend(fontsize=7, ncol=3, loc="lower right")
    fig.suptitle(f"FlashH2D (pinned host -> HBM page gather): {title_suffix}", fontsize=11)
    save(fig, results / f"flash-h2d-{tag}.png")


# ---- (c) FlashD2H -------------------------------------------------------------------------------------------------
def plot_d2h(results: Path, tag: str, title_suffix: str) -> None:
    d = load(results, f"flash-d2h-{tag}.json")
    if d is None:
        return
    rows = d["results"]
    threads = [f["threads"] for f in rows[0]["flash_d2h"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax1, ax2, ax3 = axes
    series = [(f"FlashD2HSaver, {n} threads", [next(f["gbps"] for f in r["flash_d2h"] if f["threads"] == n)
                                               for r in rows]) for n in threads]
    sms = [f["sms"] for f in rows[0].get("flash_d2h_uva", [])]
    series += [(f"FlashD2H uva (GPU scatter), {n} SMs", [next(f["gbps"] for f in r["flash_d2h_uva"] if f["sms"] == n)
                                                        for r in rows]) for n in sms]
    series += [("one copy_ per contiguous fragment (baseline)", [r["per_fragment_copy"]["gbps"] for r in rows]),
               ("one contiguous copy per layer", [r["contiguous_per_layer_gbps"] for r in rows]),
               ("one contiguous copy of the step (ceiling)", [r["contiguous_gbps"] for r in rows])]
    saver_colors = ["tab:green", "tab:olive", "tab:cyan", "tab:blue"]
    uva_colors = ["#8c564b", "#c49c94", "#e377c2"]
    colors = ([saver_colors[i % len(saver_colors)] for i in range(len(threads))]
              + [uva_colors[i % len(uva_colors)] for i in range(len(sms))] + ["tab:red", "silver", "dimgray"])
    n = len(series)
    w = 0.8 / n
    for i, (lab, vals) in enumerate(series):
        xs = [j + (i - (n - 1) / 2) * w for j in range(len(rows))]
        bars = ax1.bar(xs, vals, w, color=colors[i], label=lab)
        label_bars(ax1, bars, "{:.2f}", 7)
    for j, r in enumerate(rows):
        ax1.plot([j - 0.42, j + 0.42], [GOAL_COPY_RATIO * r["contiguous_gbps"]] * 2, color="black", ls="--", lw=1)
        best = max(f["gbps"] for f in r["flash_d2h"] + r.get("flash_d2h_uva", []))
        ax1.annotate(f"best saver {best / r['contiguous_gbps']:.2f}x of contiguous\n(goal {GOAL_COPY_RATIO}x, dashed)",
                     (j, 120), ha="center", fontsize=7.5)
    ax1.set_yscale("log")
    ax1.set_ylim(0.01, 600)
    ax1.set_xticks(range(len(rows)))
    ax1.set_xticklabels([f"{r['tokens']} new tokens x {d['shape']['layers']} layers\n({r['step_mib']:.0f} MiB per step)"
                         for r in rows], fontsize=8)
    ax1.set_ylabel("GB/s of new KV bytes into the host store (log scale)")
    ax1.set_title("Save one step's new KV from HBM to the pinned host store (end to end)", fontsize=9)
    ax1.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)

    hc = d["host_ceilings"]
    tn = sorted(int(k) for k in hc["scatter_gbps"])
    ax2.plot(tn, [hc["scatter_gbps"][str(k)] for k in tn], "o-", color="tab:green", label="CPU scatter alone")
    ax2.plot(tn, [hc["memcpy_gbps"][str(k)] for k in tn], "s--", color="tab:blue", label="plain host memcpy")
    big = max(r["contiguous_gbps"] for r in rows)
    ax2.axhline(big, color="black", lw=1.2)
    ax2.annotate(f"contiguous D2H {big} GB/s", (tn[0], big), xytext=(2, 3), textcoords="offset points", fontsize=8)
    ax2.axhline(GOAL_COPY_RATIO * big, color="black", ls="--", lw=1)
    ax2.annotate(f"goal {GOAL_COPY_RATIO}x", (tn[0], GOAL_COPY_RATIO * big), xytext=(2, 3), textcoords="offset points",
                 fontsize=8)
    ax2.set_xticks(tn)
    ax2.set_ylim(0, 65)
    ax2.set_xlabel("host threads")
    ax2.set_ylabel("GB/s (host memory only, no GPU)")
    ax2.set_title(f"Host ceilings ({d['host_cpus']} CPUs), 32 layers x 8192 tokens", fontsize=9)
    ax2.legend(fontsize=7.5, loc="lower right")

    slow = [r["interference"]["slowdown"] for r in rows]
    bars = ax3.bar([j - 0.15 for j in range(len(rows))], slow, 0.3, color="tab:orange", label="staged (CPU threads)")
    label_bars(ax3, bars, "{:.2f}x", 8)
    if sms:
        uva_slow = [next(f["slowdown"] for f in r["flash_d2h_uva"] if f["sms"] == max(sms)) for r in rows]
        bars = ax3.bar([j + 0.15 for j in range(len(rows))], uva_slow, 0.3, color="#8c564b",
                       label=f"uva, {max(sms)} SMs")
        label_bars(ax3, bars, "{:.2f}x", 8)
        slow = slow + uva_slow
        ax3.legend(fontsize=7.5, loc="lower right")
    ax3.axhline(1.0, color="black", lw=1)
    ax3.set_xticks(range(len(rows)))
    ax3.set_xticklabels([str(r["tokens"]) for r in rows])
    ax3.set_xlabel("new tokens per step")
    ax3.set_ylabel("matmul time with saver / alone")
    ax3.set_ylim(0, max(slow) * 1.25)
    ax3.set_title(f"Interference with {rows[0]['interference']['matmuls']} matmuls on the\ncompute stream "
                  f"(saver with {max(threads)} threads)", fontsize=9)
    fig.suptitle(f"FlashD2H (new KV -> pinned host store): {title_suffix}", fontsize=11)
    save(fig, results / f"flash-d2h-{tag}.png")


# ---- (d) end-to-end smoke -----------------------------------------------------------------------------------------
def engine_label(run: dict, max_len: int) -> str:
    ss = run.get("sparseserve")
    if ss is None:
        return f"vLLM {run['backend']}\n(FA3, dense)"
    lab = f"sparseserve\nbudget {ss['token_budget']}"
    if ss["token_budget"] >= max_len:
        lab += "\n(whole context)"
    if ss.get("offload"):
        lab += f"\n+ offload ({ss['host_kv_gib']} GiB host,\n{ss['hbm_cache_gib']} GiB HBM cache)"
    return lab


def plot_e2e(results: Path, tag: str, title_suffix: str, name: str = "e2e-smoke") -> None:
    d = load(results, f"{name}-{tag}.json")
    if d is None:
        return
    eager = d.get("eager", True)
    runs = [r for r in d["runs"] if "error" not in r]
    labels = [engine_label(r, d["input_len"] + d["output_len"]) for r in runs]
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"][: len(runs)]
    panels = [("decode_ms_per_step", "decode time per step (ms)", "{:.1f} ms"),
              ("prefill_only_s", "prefill-only pass wall time (s)", "{:.2f} s")]
    if "long_prefill_s" in runs[0]:
        panels.append(("long_prefill_s", f"{d['long_prompts']} prefills of {d['long_len']} tokens (s)", "{:.2f} s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.8))
    ax1, ax2 = axes[0], axes[1]
    if len(panels) == 3:
        axes[2].set_title(f"Long prompts: {d['long_prompts']} x {d['long_len']} tokens, max_tokens=1", fontsize=9)
    for ax, (key, unit, fmt) in zip(axes, panels):
        vals = [r[key] for r in runs]
        bars = ax.bar(range(len(runs)), vals, color=colors)
        label_bars(ax, bars, fmt, 8)
        base = vals[0]
        for i, v in enumerate(vals[1:], 1):
            ax.annotate(f"{v / base:.2f}x\ndense time", (i, v / 2), ha="center", fontsize=8, color="white",
                        fontweight="bold")
        for i, r in enumerate(runs):
            if "tokens_equal_to_dense" in r:
                ax.annotate(f"tokens = dense\n{r['tokens_equal_to_dense']}", (i, 0), xytext=(0, 4),
                            textcoords="offset points", ha="center", fontsize=7, color="white")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, fontsize=7.5)
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(vals) * 1.15)
    ax1.set_title("Decode: (prefill+decode - prefill-only) / (output_len - 1)", fontsize=9)
    ax2.set_title(f"Prefill of {d['prompts']} prompts x {d['input_len']} tokens (max_tokens=1)", fontsize=9)
    if eager:
        note = ("All four engines ran with enforce_eager=True. The engine log shows Triton JIT compiles of the sparse "
                "decode kernels during the timed prefill+decode pass of every sparseserve engine,\nso their decode "
                "ms/step include one-time compile time (see results/README.md).")
        mode = "eager mode (no CUDA graphs)"
    else:
        note = ("Every engine: -O0 (no torch.compile) with full CUDA graphs for decode batches (FULL_DECODE_ONLY); "
                "offload declares no CUDA-graph support, so vLLM ran that engine without graphs.")
        mode = "full decode CUDA graphs"
    fig.text(0.01, 0.005, note, fontsize=7.5, style="italic")
    fig.suptitle(f"vLLM 0.26 end-to-end smoke, {d['model']} shape, dummy weights, {mode}, "
                 f"{d['prompts']} x {d['input_len']} in / {d['output_len']} out: {title_suffix}", fontsize=10)
    save(fig, results / f"{name}-{tag}.png", bottom=0.05)


# ---- page cache ---------------------------------------------------------------------------------------------------
def plot_page_cache(results: Path, tag: str, title_suffix: str) -> None:
    d = load(results, f"page-cache-{tag}.json")
    if d is None:
        return
    per_heads = sorted({b["params"]["per_head"] for b in d["benchmarks"]})

    def rate(prefix: str, device: str | None, ph: int):
        for b in d["benchmarks"]:
            if b["name"].startswith(prefix) and b["params"]["per_head"] == ph and \
                    (device is None or b["params"].get("device") == device):
                return b["extra_info"]["pages_per_s"] / 1e6
        return None

    series = [("PageCache.resolve, CPU (1 torch thread)", "test_page_cache_resolve", "cpu", "tab:blue"),
              ("PageCache.resolve, CUDA (H200)", "test_page_cache_resolve", "cuda", "tab:green"),
              ("OrderedDict LRU baseline (Python)", "test_ordered_dict_baseline", None, "tab:gray")]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    w = 0.8 / len(series)
    for i, (lab, prefix, dev, col) in enumerate(series):
        vals = [rate(prefix, dev, ph) for ph in per_heads]
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(per_heads))]
        bars = ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], w,
                      color=col, label=lab)
        label_bars(ax, bars, "{:.2f}", 8)
    ax.set_xticks(range(len(per_heads)))
    ax.set_xticklabels([f"{ph} pages selected per KV head per step" for ph in per_heads])
    ax.set_ylabel("resolved pages per second (millions)")
    ax.legend(fontsize=8)
    ax.set_title(f"HBM page cache lookup (4 layers x 16 requests x 8 KV heads, 6 steps): {title_suffix}",
                 fontsize=9)
    save(fig, results / f"page-cache-{tag}.png")


# ---- offload: one decode step, and batch control on/off ----------------------------------------------------------
def plot_offload(results: Path, tag: str, title_suffix: str) -> None:
    before = load(results, f"offload-step-{tag}-before.json")
    after = load(results, f"offload-step-{tag}-after.json")
    bc = load(results, f"batch-control-{tag}.json")
    if before is None or after is None or bc is None:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.2))
    labels = ["offload step,\nsyncing page cache", "offload step,\nsync-free page cache", "same attention,\nKV in HBM"]
    vals = [before["offload_step_ms_median"], after["offload_step_ms_median"], after["hbm_only_step_ms_median"]]
    bars = ax1.bar(range(3), vals, color=["tab:gray", "tab:purple", "tab:green"])
    label_bars(ax1, bars, "{:.1f} ms", 8)
    ax1.set_xticks(range(3))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("one decode step, 32 layers (ms, median)")
    ax1.set_title(f"{after['batch']} requests x {after['context']} tokens, {after['cache_gib']} GiB HBM cache "
                  f"(thrashing)", fontsize=9)
    runs = {r["batch_control"]: r for r in bc["runs"]}
    names = ["control on", "control off"]
    for ax, key, unit in ((ax2, "output_tok_s", "output tokens/s"),
                          (ax3, "gib_loaded_per_step", "GiB loaded host->HBM per decode step")):
        v = [runs[True][key], runs[False][key]]
        bars = ax.bar(range(2), v, color=["tab:blue", "tab:orange"])
        label_bars(ax, bars, "{:.3g}", 9)
        ax.set_xticks(range(2))
        ax.set_xticklabels([f"{n}\n(largest batch {runs[c]['max_batch_cap']})" for n, c in zip(names, (True, False))],
                           fontsize=8)
        ax.set_ylabel(unit)
    ax2.set_title(f"Batch control: throughput on/off = {bc['throughput_on_vs_off']}x (goal 1.3x)", fontsize=9)
    ax3.set_title(f"Loads per step off/on = {bc['loads_off_vs_on']}x fewer with control (goal 10x)", fontsize=9)
    fig.suptitle(f"Offload decode, Llama-3.1-8B shape: {bc['requests']} x {bc['context']} tokens, "
                 f"{bc['cache_gib']} GiB HBM cache, tokens equal {bc['tokens_equal']}: {title_suffix}", fontsize=10)
    save(fig, results / f"offload-{tag}.png")


SEGMENTED_SYSTEMS = ("plain", "chunked", "segmented", "offload-chunked")  # gpu_segmented_prefill.py's engines
SEGMENTED_COLORS = ("tab:green", "tab:gray", "tab:blue", "tab:orange")


def plot_segmented(results: Path, pre_name: str, load_name: str, out_name: str, title_suffix: str) -> None:
    pre = load(results, pre_name)
    ld = load(results, load_name)
    if pre is None or ld is None:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.2))
    names, colors = SEGMENTED_SYSTEMS, SEGMENTED_COLORS
    labels = ["KV in HBM,\none step", "KV in HBM,\nchunks", "offload,\nlayer-segmented", "offload,\nchunks"]
    for ax, key, length in ((ax1, "long_s", pre["long_len"]), (ax2, "mid_s", pre["mid_len"])):
        vals = [pre["runs"][n][key] for n in names]
        bars = ax.bar(range(4), vals, color=colors)
        label_bars(ax, bars, "{:.2f} s", 8)
        ax.set_xticks(range(4))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("time to first token, prompt alone (s)")
        ratio = pre[f"segmented_vs_plain_{key}"]
        ax.set_title(f"{length // 1024}K-token prompt: segmented / plain = {ratio}x (chunk {pre['chunk']})", fontsize=9)
    runs = ld["runs"]
    vals = [runs["segmented"]["mean_ttft_s"], runs["offload-chunked"]["mean_ttft_s"]]
    bars = ax3.bar(range(2), vals, color=["tab:blue", "tab:orange"])
    label_bars(ax3, bars, "{:.1f} s", 9)
    ax3.set_xticks(range(2))
    ax3.set_xticklabels(["layer-segmented", "chunked"], fontsize=8)
    ax3.set_ylabel("mean time to first token of the late prompts (s)")
    censored = runs["offload-chunked"].get("censored_at_s")
    if censored:
        ax3.annotate(f"none started within {censored} s\n(run cut there)", (1, vals[1]), ha="center", va="top",
                     xytext=(0, -14), textcoords="offset points", fontsize=8)
    ax3.set_title(f"{ld['late']} x {ld['late_len'] // 1024}K prompts arriving while {ld['decodes']} x "
                  f"{ld['decode_len'] // 1024}K decode {ld.get('decode_out', 64)} tokens,\noffload, "
                  f"{ld['cache_gib']} GiB cache: {'>= ' if censored else ''}{ld['ttft_reduction']}x lower", fontsize=8)
    peak = pre["runs"]["segmented"]["segment_peak_bytes"] / 2**30
    fig.suptitle(f"Layer-segmented prefill, Llama-3.1-8B shape (peak prefill buffers {peak:.2f} GiB = hidden states "
                 f"+ one layer's KV of the 128K prompt): {title_suffix}", fontsize=10)
    save(fig, results / out_name)


def plot_batch_control(ax, bc: dict, title: str) -> None:
    """Output tokens/s with batch control on and off (`gpu_batch_control.py`'s JSON), on `ax`."""
    runs = {r["batch_control"]: r for r in bc["runs"]}
    bars = ax.bar(range(2), [runs[True]["output_tok_s"], runs[False]["output_tok_s"]], color=["tab:blue", "tab:orange"])
    label_bars(ax, bars, "{:.3g}", 9)
    ax.set_xticks(range(2))
    ax.set_xticklabels([f"control {n}\nlargest batch {runs[c]['max_batch_cap']}\n"
                        f"{runs[c]['gib_loaded_per_step']:.2f} GiB loaded/step" for n, c in (("on", True), ("off", False))],
                       fontsize=8)
    ax.set_ylabel("output tokens/s (prefill included)")
    ax.set_title(f"{title} ({bc['requests']} x {bc['context'] // 1024}K, {bc['cache_gib']:g} GiB cache): "
                 f"{bc['throughput_on_vs_off']}x (goal 1.3x),\n{bc['loads_off_vs_on']}x fewer loads (goal 10x)",
                 fontsize=9)


def plot_set9(results: Path, tag: str, title_suffix: str) -> None:
    """Fifth set: offload decode in full CUDA graphs, batch control with it, segmented prefill and its profile."""
    graphs = load(results, f"offload-graphs-{tag}.json")
    graphs1 = load(results, f"offload-graphs-{tag}-batch1.json")
    bc = load(results, f"batch-control-graphs-{tag}.json")
    pre = load(results, f"segmented-prefill-{tag}-set9.json")
    prof = load(results, f"segmented-profile-{tag}.json")
    if None in (graphs, graphs1, bc, pre, prof):
        return
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(20, 5.2))
    shapes = [(graphs, f"{graphs['prompts']} x {graphs['input_len'] // 1024}K,\n"
                       f"{graphs['sparseserve']['hbm_cache_gib']:g} GiB cache"),
              (graphs1, f"{graphs1['prompts']} x {graphs1['input_len'] // 1024}K,\n"
                        f"{graphs1['sparseserve']['hbm_cache_gib']:g} GiB cache")]
    width = 0.38
    for i, (mode, color) in enumerate((("eager", "tab:gray"), ("full_decode_graphs", "tab:purple"))):
        vals = [d["runs"][mode]["decode_ms_per_step"] for d, _ in shapes]
        bars = ax1.bar([x + (i - 0.5) * width for x in range(2)], vals, width, color=color,
                       label="eager" if i == 0 else "full decode CUDA graphs")
        label_bars(ax1, bars, "{:.1f} ms", 8)
    ax1.set_xticks(range(2))
    ax1.set_xticklabels([lab for _, lab in shapes], fontsize=8)
    ax1.set_ylabel("offload decode step (ms)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"Offload decode: graphs {graphs['runs']['eager']['decode_ms_per_step'] / graphs['runs']['full_decode_graphs']['decode_ms_per_step']:.2f}x"
                  f" / {graphs1['runs']['eager']['decode_ms_per_step'] / graphs1['runs']['full_decode_graphs']['decode_ms_per_step']:.2f}x faster,"
                  f" tokens equal {graphs['tokens_same']}, {graphs1['tokens_same']}", fontsize=9)
    plot_batch_control(ax2, bc, "Batch control in graphs")
    for i, (n, c) in enumerate(zip(SEGMENTED_SYSTEMS, SEGMENTED_COLORS)):
        vals = [pre["runs"][n]["mid_s"] / pre["runs"]["plain"]["mid_s"], pre["runs"][n]["long_s"] / pre["runs"]["plain"]["long_s"]]
        bars = ax3.bar([x + (i - 1.5) * 0.2 for x in range(2)], vals, 0.2, color=c, label=n)
        label_bars(ax3, bars, "{:.2f}", 7)
    ax3.axhline(1.05, color="k", lw=0.8, ls="--")
    ax3.set_xticks(range(2))
    ax3.set_xticklabels([f"{pre['mid_len'] // 1024}K prompt (plain {pre['runs']['plain']['mid_s']:.2f} s)",
                         f"{pre['long_len'] // 1024}K prompt (plain {pre['runs']['plain']['long_s']:.2f} s)"], fontsize=8)
    ax3.set_ylabel("time to first token / plain (dashed: goal 1.05)")
    ax3.legend(fontsize=8)
    ax3.set_title(f"Prefill alone: segmented / plain = {pre['segmented_vs_plain_mid_s']}x (32K), "
                  f"{pre['segmented_vs_plain_long_s']}x (128K)", fontsize=9)
    cats = ["gemm", "attention", "sparseserve:flash_d2h_scatter", "other", "memcpy_other"]
    bottom = [0.0, 0.0]
    for cat, color in zip(cats, ["tab:green", "tab:blue", "tab:orange", "tab:gray", "tab:brown"]):
        vals = [prof["runs"][r]["categories"].get(cat, {}).get("ms", 0.0) for r in ("plain", "segmented")]
        ax4.bar(range(2), vals, 0.6, bottom=bottom, color=color, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    spans = [prof["runs"][r]["span_ms"] for r in ("plain", "segmented")]
    ax4.scatter(range(2), spans, color="k", marker="_", s=900, zorder=3, label="trace span (GPU busy + idle)")
    ax4.set_xticks(range(2))
    ax4.set_xticklabels(["plain", "segmented"], fontsize=8)
    ax4.set_ylabel(f"GPU kernel time, one {prof['mid_len'] // 1024}K prefill (ms)")
    ax4.set_ylim(0, max(spans) * 1.45)
    ax4.legend(fontsize=7, loc="upper left", ncol=2)
    ax4.set_title(f"Profile: attention {prof['segmented_vs_plain_attention']}x (goal <= 1.05), GPU busy "
                  f"{prof['segmented_vs_plain_busy']}x,\nall kernels {prof['segmented_vs_plain_kernel']}x, "
                  f"profiled TTFT {prof['segmented_vs_plain_profiled_ttft']}x", fontsize=9)
    fig.suptitle(f"Fifth set, Llama-3.1-8B shape: {title_suffix}", fontsize=10)
    save(fig, results / f"set9-{tag}.png")

def plot_set10(results: Path, tag: str = "h200-2026-11-30") -> None:
    """Sixth set: the offload decode step before/after the Triton page cache, `gqa_reduce` cost, batch control, serving."""
    prof = {k: load(results, f"offload-profile-{tag}-{k}.json") for k in ("before", "after")}
    sd = {(s, r): load(results, f"sparse-decode-{tag}-b64-ctx32k-{s}-{r}.json")
          for s in ("cuboid_mean", "mean") for r in ("sum", "mass")}
    bc = load(results, f"batch-control-{tag}.json")
    e2e = load(results, f"e2e-serve-{tag}/summary.json")
    if None in (*prof.values(), *sd.values(), bc, e2e):
        return
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(21, 5.2))
    labels = ["a53a7ec\n(torch resolve)", "fd947f1\n(Triton resolve)"]
    for i, (sysn, color) in enumerate((("sparse", "tab:blue"), ("offload", "tab:red"))):
        runs = [prof[k]["runs"][sysn] for k in ("before", "after")]
        bars = ax1.bar([x + (i - 0.5) * 0.38 for x in range(2)], [r["wall_ms_per_step"] for r in runs], 0.38,
                       color=color, label=f"{sysn} (kernels/step: {', '.join(str(int(r['trace']['per_step']['kernels'])) for r in runs)})")
        label_bars(ax1, bars, "{:.2f} ms", 8)
    ax1.set_xticks(range(2))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("decode step, 1 x 16K, all pages cached (ms)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"Offload vs sparse per step: {prof['before']['offload_vs_sparse']['wall_ms_per_step']}x -> "
                  f"{prof['after']['offload_vs_sparse']['wall_ms_per_step']}x", fontsize=9)
    groups = [("cuboid_mean", "sum"), ("cuboid_mean", "mass"), ("mean", "sum"), ("mean", "mass")]
    vals = [sd[g]["times_us"]["wrapper_run"] for g in groups]
    bars = ax2.bar(range(4), vals, color=["tab:blue", "tab:green"] * 2)
    label_bars(ax2, bars, "{:.0f} us", 8)
    fa3 = [sd[g]["times_us"]["wrapper_run"] * sd[g]["speedup_vs_vllm_fa3"] for g in groups]
    ax2.axhline(sum(fa3) / len(fa3) / GOAL_DECODE_SPEEDUP, color="k", lw=0.8, ls="--", label="FA3 dense / 5 (goal)")
    ax2.set_xticks(range(4))
    ax2.set_xticklabels([f"{s}\n{r}: {sd[(s, r)]['speedup_vs_vllm_fa3']:.2f}x FA3" for s, r in groups], fontsize=8)
    ax2.set_ylabel("sparse decode step, batch 64 x 32K (us)")
    ax2.legend(fontsize=8)
    ax2.set_title("gqa_reduce cost (score + select + attend)", fontsize=9)
    plot_batch_control(ax3, bc, "Batch control")
    sysrows = {n: v["runs"] for n, v in e2e["systems"].items()}
    names = [n for n in ("dense", "sparseserve") if n in sysrows]
    thr = [sysrows[n]["rate-inf"]["output_throughput"] for n in names]
    tpot = [sysrows[n]["batch1"]["mean_tpot_ms"] for n in names]
    bars = ax4.bar([x - 0.2 for x in range(len(names))], thr, 0.4, color="tab:purple", label="output tok/s, 8 requests")
    label_bars(ax4, bars, "{:.1f}", 8)
    ax4b = ax4.twinx()
    bars = ax4b.bar([x + 0.2 for x in range(len(names))], tpot, 0.4, color="tab:gray", label="batch-1 ms per token")
    label_bars(ax4b, bars, "{:.2f}", 8)
    ax4.set_ylim(0, max(thr) * 1.35)
    ax4b.set_ylim(0, max(tpot) * 1.35)
    ax4.set_xticks(range(len(names)))
    ax4.set_xticklabels(names, fontsize=8)
    ax4.set_ylabel("output tokens/s at rate inf")
    ax4b.set_ylabel("single-request decode, ms per token")
    ax4.legend(fontsize=8, loc="upper left")
    ax4b.legend(fontsize=8, loc="upper right")
    g = e2e["goals"]["sparseserve"]
    ax4.set_title(f"vllm serve: SparseServe {g['throughput_vs_dense']}x dense throughput, "
                  f"{g['batch1_decode_vs_dense']}x batch-1 decode", fontsize=9)
    fig.suptitle("Sixth set, Llama-3.1-8B shape: NVIDIA H200, 2026-11-30", fontsize=10)
    save(fig, results / f"set10-{tag}.png")


def plot_set11(results: Path, tag: str = "h200-2026-11-30") -> None:
    """Seventh set: the batch-1 decode step over four commits, batch control at 4 GiB, the resolve and select kernels."""
    commits = ("before", "after", "5ef73cf", "24bef69")
    prof = {k: load(results, f"offload-profile-{tag}-{k}.json") for k in commits}
    bc = load(results, f"batch-control-{tag}-16x16k-4gib.json")
    rs = load(results, f"resolve-{tag}.json")
    sel = {b: load(results, f"sparse-decode-{tag}-{b}-tune.json") for b in ("b1-ctx16k", "b64-ctx32k")}
    if None in (*prof.values(), bc, rs, *sel.values()):
        return
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(22, 5.2))
    labels = ["a53a7ec", "fd947f1", "5ef73cf", "24bef69"]
    for i, (sysn, color) in enumerate((("sparse", "tab:blue"), ("offload", "tab:red"))):
        vals = [prof[k]["runs"][sysn]["wall_ms_per_step"] for k in commits]
        bars = ax1.bar([x + (i - 0.5) * 0.38 for x in range(4)], vals, 0.38, color=color, label=sysn)
        label_bars(ax1, bars, "{:.2f}", 7)
    ax1.axhline(5.56, color="k", lw=0.8, ls="--", label="dense FA3, vllm serve batch 1 (5.56 ms)")
    ax1.set_xticks(range(4))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("decode step, 1 x 16K (ms)")
    ax1.legend(fontsize=8)
    ax1.set_title("Batch-1 decode step (-O0, full decode graphs)", fontsize=9)
    plot_batch_control(ax2, bc, "Batch control")
    sizes = list(rs["sizes"])
    for i, (case, color) in enumerate((("hits", "tab:green"), ("misses", "tab:orange"))):
        five = [rs["sizes"][n][case]["us_per_call"]["five-launches"] for n in sizes]
        fused = [rs["sizes"][n][case]["us_per_call"].get(rs["sizes"][n][case]["best_fused"] or "", float("nan"))
                 for n in sizes]
        x = [j + (i - 0.5) * 0.4 for j in range(len(sizes))]
        bars = ax3.bar([v - 0.1 for v in x], five, 0.2, color=color, alpha=0.45, label=f"{case}: five launches")
        label_bars(ax3, bars, "{:.1f}", 7)
        bars = ax3.bar([v + 0.1 for v in x], fused, 0.2, color=color, label=f"{case}: fused (best tier)")
        label_bars(ax3, bars, "{:.1f}", 7)
    ax3.set_xticks(range(len(sizes)))
    ax3.set_xticklabels([f"{n} ids" for n in sizes], fontsize=8)
    ax3.set_ylabel("begin_layer + resolve, us per call (CUDA graph)")
    ax3.legend(fontsize=7)
    ax3.set_title("Page-cache resolve: one program vs five launches", fontsize=9)
    for i, (b, color) in enumerate((("b1-ctx16k", "tab:blue"), ("b64-ctx32k", "tab:purple"))):
        t = sel[b]["tuning"]["select"]
        vals = [t[f"radix={r},warps=4"] for r in (2, 4, 16)]
        bars = ax4.bar([j + (i - 0.5) * 0.38 for j in range(3)], vals, 0.38, color=color,
                       label={"b1-ctx16k": "batch 1 x 16K (8 programs)", "b64-ctx32k": "batch 64 x 32K (512)"}[b])
        label_bars(ax4, bars, "{:.1f}", 7)
    ax4.set_xticks(range(3))
    ax4.set_xticklabels(["radix 2\n(= bisection, 32 rounds)", "radix 4\n(16 rounds)", "radix 16\n(8 rounds)"],
                        fontsize=8)
    ax4.set_ylabel("select_pages, us per layer (4 warps)")
    ax4.legend(fontsize=8)
    ax4.set_title("Top-k threshold search", fontsize=9)
    fig.suptitle("Seventh set, Llama-3.1-8B shape: NVIDIA H200, 2026-11-30 (04:38-05:33 UTC)", fontsize=10)
    save(fig, results / f"set11-{tag}.png")


def plot_set12(results: Path, tag: str = "h200x2-2026-11-30") -> None:
    """Eighth set: the four systems end to end, batch-1 decode (serving vs offline), saturation and Qwen, prefill."""
    def runs(folder):
        d = load(results / folder, "summary.json")
        return None if d is None else {k: v["runs"] for k, v in d["systems"].items()}

    main, sat, qw = (runs(f"e2e-serve-{n}{tag}") for n in ("", "sat24-", "qwen-"))
    prof = load(results, f"offload-profile-{tag}-c563416.json")
    seg = load(results, f"segmented-prefill-{tag}-c563416.json")
    if None in (main, sat, qw, prof, seg) or not (results / f"e2e-serve-batch1-{tag}").is_dir():
        return
    systems = ("dense", "native-offload", "sparse", "sparseserve")
    colors = {"dense": "tab:gray", "native-offload": "tab:brown", "sparse": "tab:blue", "sparseserve": "tab:red"}
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(23, 5.4))
    for i, s in enumerate(systems):
        vals = [main[s]["rate-inf"]["output_throughput"], main[s]["rate-0.25"]["output_throughput"]]
        bars = ax1.bar([x + (i - 1.5) * 0.2 for x in range(2)], vals, 0.2, color=colors[s], label=s,
                       hatch="//" if s == "native-offload" else None)
        label_bars(ax1, bars, "{:.1f}", 7)
    ax1.set_xticks(range(2))
    ax1.set_xticklabels(["rate inf (8 requests)", "rate 0.25/s (8 requests)\nnative offload: repeated prompts"],
                        fontsize=8)
    ax1.set_ylabel("output tokens/s")
    ax1.legend(fontsize=8)
    ax1.set_title("Llama-3.1-8B, inputs 4K-128K, outputs 64-512", fontsize=9)
    labels, vals, cols = [], [], []
    for name, r, sysns in (("8 req run", main, systems), ("Qwen2.5-7B", qw, ("dense", "sparseserve")),
                           ("24 req run", sat, ("dense", "sparseserve"))):
        for s in sysns:
            labels.append(f"{s}\n{name}")
            vals.append(r[s]["batch1"]["mean_tpot_ms"])
            cols.append(colors[s])
    b1d = load(results / f"e2e-serve-batch1-{tag}", "dense-batch1.json")
    b1s = load(results / f"e2e-serve-batch1-{tag}", "sparseserve-batch1.json")
    for s, r in (("dense", b1d), ("sparseserve", b1s)):
        labels.append(f"{s}\nthrottled publish")
        vals.append(r["mean_tpot_ms"])
        cols.append(colors[s])
    for s, key in (("sparse", "sparse"), ("sparseserve", "offload")):
        labels.append(f"{s}\noffline LLM")
        vals.append(prof["runs"][key]["wall_ms_per_step"])
        cols.append(colors[s])
    bars = ax2.bar(range(len(vals)), vals, 0.7, color=cols)
    label_bars(ax2, bars, "{:.2f}", 7)
    ax2.set_xticks(range(len(vals)))
    ax2.set_xticklabels(labels, fontsize=6, rotation=60)
    ax2.set_ylabel("batch-1 decode, ms per token (1 x 16K in)")
    ax2.set_title("Single-request decode: vllm serve (mean TPOT) vs offline step", fontsize=9)
    groups = (("24 requests, rate inf\n(Llama)", sat), ("8 requests, rate inf\n(Qwen2.5-7B)", qw))
    for i, s in enumerate(("dense", "sparseserve")):
        vals = [g[s]["rate-inf"]["output_throughput"] for _, g in groups]
        bars = ax3.bar([x + (i - 0.5) * 0.38 for x in range(2)], vals, 0.38, color=colors[s], label=s)
        label_bars(ax3, bars, "{:.1f}", 8)
    ax3.set_xticks(range(2))
    ax3.set_xticklabels([g for g, _ in groups], fontsize=8)
    ax3.set_ylabel("output tokens/s")
    ax3.legend(fontsize=8)
    ax3.set_title("More requests; the second model", fontsize=9)
    engines = ("plain", "chunked", "segmented", "offload-chunked")
    for i, (key, name) in enumerate((("mid_s", "32K prompt"), ("long_s", "128K prompt"))):
        vals = [seg["runs"][e][key] / seg["runs"]["plain"][key] for e in engines]
        bars = ax4.bar([x + (i - 0.5) * 0.38 for x in range(len(engines))], vals, 0.38,
                       color=("tab:green", "tab:olive")[i], label=name)
        label_bars(ax4, bars, "{:.3f}", 7)
    ax4.axhline(1.05, color="k", lw=0.8, ls="--", label="goal for offload on: 1.05x")
    finish_axis(ax4, engines, "time to first token / plain", "Prefill alone (GPU 1, beside the profile on GPU 0)")
    fig.suptitle("Eighth set, NVIDIA H200 x2 (one lane per GPU), 2026-11-30 (06:45-07:22 UTC), commit c563416",
                 fontsize=10)
    save(fig, results / f"set12-{tag}.png", bottom=0.12)


def plot_set13(results: Path, tag: str = "h200x2-2026-11-30") -> None:
    """Ninth set: the batch-1 step under the served engine's settings, and layer-segmented prefill vs plain."""
    served = load(results, f"offload-profile-{tag}-served-settings.json")
    default = load(results, f"offload-profile-{tag}-c563416.json")
    runs = [("A: chunk 8192\nnormal priority", "chunk8192"), ("B: chunk 32768\nnormal priority", "chunk32768"),
            ("C: priority, 16 SMs\nbeside a profile", "priority"),
            ("D: priority, 16 SMs\nGPU 0, beside D 8 SMs", "priority-sms16-beside"),
            ("D: priority, 8 SMs\nGPU 1, beside D 16 SMs", "priority-sms8-beside"),
            ("E: priority, 16 SMs\nalone", "priority-sms16-alone"), ("E: priority, 8 SMs\nalone", "priority-sms8-alone")]
    segs = [load(results, f"segmented-prefill-{tag}-{name}.json") for _, name in runs]
    if served is None or default is None or None in segs:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(20, 5.6))
    labels = ["sparse\noffline, defaults", "offload\noffline, defaults", "sparse\noffline, served settings",
              "offload\noffline, served settings"]
    vals = [default["runs"]["sparse"]["wall_ms_per_step"], default["runs"]["offload"]["wall_ms_per_step"],
            served["runs"]["sparse"]["wall_ms_per_step"], served["runs"]["offload"]["wall_ms_per_step"]]
    bars = ax1.bar(range(4), vals, 0.7, color=["tab:blue", "tab:red"] * 2)
    label_bars(ax1, bars, "{:.2f}", 8)
    ax1.set_xticks(range(4))
    ax1.set_xticklabels(labels, fontsize=7)
    ax1.set_ylabel("ms per decode step (unprofiled), 1 x 16K")
    ax1.set_title("Batch-1 step, offline LLM; served settings: chunk 8192,\nmax_model_len 131072, max_num_seqs 64",
                  fontsize=9)
    cats = ("other", "sparseserve:flash_h2d", "sparseserve:flash_d2h_scatter")
    for i, (name, d) in enumerate((("defaults (c563416)", default), ("served settings", served))):
        per = {k: d["runs"]["offload"]["trace"]["categories"].get(k, {}).get("ms", 0.0)
               - d["runs"]["sparse"]["trace"]["categories"].get(k, {}).get("ms", 0.0) for k in cats}
        bars = ax2.bar([x + (i - 0.5) * 0.38 for x in range(len(cats))], [per[k] for k in cats], 0.38,
                       color=("tab:gray", "tab:red")[i], label=name)
        label_bars(ax2, bars, "{:.3f}", 8)
    ax2.set_xticks(range(len(cats)))
    ax2.set_xticklabels([c.replace("sparseserve:", "") for c in cats], fontsize=8)
    ax2.set_ylabel("GPU ms per step, offload minus sparse (profiled)")
    ax2.legend(fontsize=8)
    ax2.set_title("Where the offload step's extra GPU time goes", fontsize=9)
    for i, (key, name) in enumerate((("mid_s", "32K prompt"), ("long_s", "long prompt (128K in A, 64K after)"))):
        vals = [d["runs"]["segmented"][key] / d["runs"]["plain"][key] for d in segs]
        bars = ax3.bar([x + (i - 0.5) * 0.38 for x in range(len(segs))], vals, 0.38,
                       color=("tab:green", "tab:olive")[i], label=name)
        label_bars(ax3, bars, "{:.3f}", 7)
        for bar, v in zip(bars, vals):
            if v > 1.15:  # off the axis: its value at the top
                ax3.text(bar.get_x() + bar.get_width() / 2, 1.14, f"{v:.3f}", ha="center", va="top", fontsize=7)
    ax3.axhline(1.05, color="k", lw=0.8, ls="--", label="goal: 1.05x")
    ax3.set_ylim(0.9, 1.15)
    finish_axis(ax3, [n for n, _ in runs], "layer-segmented (offload) TTFT / plain TTFT",
                "Prefill with offload vs without: FlashD2H stream priority and SMs", fontsize=6, rotation=30)
    fig.suptitle("Ninth set, NVIDIA H200 x2, 2026-11-30 (10:14-10:37 UTC), commit a6d1db3 + the FlashD2H change",
                 fontsize=10)
    save(fig, results / f"set13-{tag}.png", bottom=0.14)


PER_HEAD_STEPS = ("quest-zmax", "quest-sum")  # set 14's decode steps: before (call 5) and after (call 8) the change


def plot_set14(results: Path, tag: str = "h200-2026-11-30") -> None:
    """Tenth set: FlashD2H's whole-block saves by the copy engine, and layer-segmented prefill with them."""
    d2h = load(results, f"flash-d2h-{tag}-blocks.json")
    seg = load(results, f"segmented-prefill-{tag}-copy-engine.json")
    prof = load(results, f"segmented-profile-{tag}-copy-engine.json")
    steps = {(kind, name): load(results, f"sparse-decode-{tag}-b64-ctx32k-{name}{suffix}.json")
             for kind, suffix in (("before", ""), ("after", "-dot")) for name in PER_HEAD_STEPS}
    if d2h is None or seg is None or prof is None or None in steps.values():
        return
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(25, 5.6))
    for i, row in enumerate(d2h["results"]):
        names = ["scatter kernel\n(ring, 8 SMs)"] + [f"copy engine,\n{e['block_ids']} ids" for e in row["flash_d2h_blocks"]]
        vals = [row["flash_d2h_uva"][0]["ratio"]] + [e["ratio"] for e in row["flash_d2h_blocks"]]
        bars = ax1.bar([x + (i - 0.5) * 0.38 for x in range(len(vals))], vals, 0.38,
                       color=("tab:cyan", "tab:blue")[i], label=f"{row['tokens']} tokens x 32 layers")
        label_bars(ax1, bars, "{:.3f}", 7)
    ax1.axhline(0.9, color="k", lw=0.8, ls="--", label="goal: 0.9x")
    ax1.set_ylim(0.5, 1.05)
    finish_axis(ax1, names, "FlashD2H GB/s / one contiguous D2H copy's GB/s",
                "FlashD2H: scatter kernel vs whole blocks by the copy engine", fontsize=7)
    ax1.legend(fontsize=8, loc="lower left")
    runs = seg["runs"]
    for i, key in enumerate(("mid_s", "long_s")):
        alls = [runs[n][key[:-2] + "_all_s"] for n in ("plain", "segmented")]
        bars = ax2.bar([x + (i - 0.5) * 0.38 for x in range(2)], [runs[n][key] for n in ("plain", "segmented")],
                       0.38, color=("tab:green", "tab:olive")[i],
                       label=("32K prompt" if i == 0 else "64K prompt") + " (median of 3, dots: each run)")
        for bar, xs in zip(bars, alls):
            ax2.plot([bar.get_x() + bar.get_width() / 2] * len(xs), xs, "k.", ms=4)
        label_bars(ax2, bars, "{:.3f}", 8)
    finish_axis(ax2, ["plain (offload off,\none step)", "layer-segmented\n(offload on)"], "time to first token (s)",
                f"Prefill alone: segmented / plain = {seg['segmented_vs_plain_mid_s']:.3f}x (32K), "
                f"{seg['segmented_vs_plain_long_s']:.3f}x (64K)", fontsize=8)
    diff = prof["segmented_minus_plain_ms"]
    cats = [c for c in diff if abs(diff[c]) >= 1.0]
    bars = ax3.bar(range(len(cats)), [diff[c] for c in cats], 0.6,
                   color=["tab:gray" if diff[c] > 0 else "tab:green" for c in cats], label="segmented - plain")
    label_bars(ax3, bars, "{:.1f}", 8)
    ax3.axhline(0, color="k", lw=0.6)
    finish_axis(ax3, cats, "kernel ms, segmented minus plain (32K, profiled)",
                f"Where segmented spends more: busy {prof['segmented_vs_plain_busy']:.3f}x, "
                f"TTFT {prof['segmented_vs_plain_profiled_ttft']:.3f}x\n(D2H copies run beside compute on a side stream)",
                fontsize=8, rotation=20)
    for i, kind in enumerate(("before", "after")):
        vals = [steps[kind, name]["times_us"]["wrapper_run"] for name in PER_HEAD_STEPS]
        bars = ax4.bar([x + (i - 0.5) * 0.38 for x in range(len(vals))], vals, 0.38,
                       color=("tab:gray", "tab:purple")[i],
                       label=("each head by multiply-adds" if i == 0 else "each KV head by one matrix product"))
        label_bars(ax4, bars, "{:.0f}", 8)
    sums = [steps["after", name]["times_us"]["wrapper_run"] for name in PER_HEAD_STEPS if name.endswith("-sum")]
    ax4.axhline(sums[0], color="k", lw=0.8, ls=":", label="quest, sum (folds the heads)")
    finish_axis(ax4, [n.replace("-", "\n") for n in PER_HEAD_STEPS], "us per decode step (batch 64 x 32K, budget 2048)",
                "Per-head page scores on the tensor cores", fontsize=8)
    fig.suptitle("Tenth set, NVIDIA H200, 2026-11-30 (13:15-13:40 UTC): FlashD2H whole-block saves by the copy engine, "
                 "per-head scoring by matrix products", fontsize=10)
    save(fig, results / f"set14-{tag}.png", bottom=0.04)


QUEST_PAGE_PASSKEY = (("16-token pages", "passkey-smollm2-cpu-quest-zmax-page16.json"),
                      ("32-token pages", "passkey-smollm2-cpu-gqa-zmax.json"),
                      ("64-token pages (default)", "passkey-smollm2-cpu-quest-page64.json"))
QUEST_PAGE_STEPS = (("quest, page 32,\n64-token tiles", "quest-zmax-p32-b128"),
                    ("quest, page 64,\n64-token tiles", "quest-zmax-p64-tile64"),
                    ("quest, page 64,\n128-token tiles\n(default)", "quest-zmax-p64"),
                    ("cuboid_mean,\npage 64", "cuboid_mean-sum-p64"), ("mean,\npage 64", "mean-mass-p64"))


def plot_set15(results: Path, tag: str = "h200-2026-11-30") -> None:
    """Eleventh set: quest's page size (pass-key accuracy on CPU, decode step on the H200)."""
    keys = [load(results, f) for _, f in QUEST_PAGE_PASSKEY]
    keys40 = [load(results, f)
              for f in ("passkey-smollm2-cpu-quest-40-zmax.json", "passkey-smollm2-cpu-quest-40-page64.json")]
    steps = [load(results, f"sparse-decode-{tag}-b64-ctx32k-{name}.json") for _, name in QUEST_PAGE_STEPS]
    if None in keys or None in keys40 or None in steps:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(17, 5.6))
    groups = [(f"{name}\n20 placements", d) for (name, _), d in zip(QUEST_PAGE_PASSKEY, keys)]
    groups += [(f"{p}-token pages\n40 placements", d) for p, d in zip((32, 64), keys40)]
    series = (("dense", "dense", "tab:gray"), ("quest@1024", "quest, budget 1024", "tab:orange"),
              ("quest@2048", "quest, budget 2048", "tab:red"))
    for i, (key, label, color) in enumerate(series):
        xs = [g + (i - 1) * 0.27 for g, (_, d) in enumerate(groups) if key in d["accuracy"]]
        vals = [round(d["accuracy"][key] * d["placements"]) for _, d in groups if key in d["accuracy"]]
        bars = ax1.bar(xs, vals, 0.27, color=color, label=label)
        label_bars(ax1, bars, "{:.0f}", 8)
    finish_axis(ax1, [g for g, _ in groups], "placements where the pass key is found",
                "Quest (zmax) on SmolLM2-135M, ~7.3K-token prompts: hits by page size", fontsize=8)
    ax1.legend(fontsize=8, loc="upper left")
    ax1.set_ylim(0, 46)
    vals = [d["times_us"]["wrapper_run"] for d in steps]
    bars = ax2.bar(range(len(vals)), vals, 0.6,
                   color=["tab:gray", "tab:gray", "tab:red", "tab:blue", "tab:green"])
    for bar, d in zip(bars, steps):
        ax2.annotate(f"{bar.get_height():.0f} us\n{d['speedup_vs_vllm_fa3']:.2f}x FA3\n"
                     f"{d['bandwidth_fraction_of_4.8TBps']['wrapper_run']:.0%} HBM",
                     (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax2.set_ylim(0, max(vals) * 1.3)
    fa3_us = steps[-1]["dense_baselines"]["vllm_fa3"]["us"]
    finish_axis(ax2, [n for n, _ in QUEST_PAGE_STEPS], "us per decode step (batch 64 x 32K, budget 2048, block 128)",
                f"Decode step; dense vLLM FA3 in the same runs: {fa3_us:.0f} us", fontsize=8)
    ax2.get_legend().remove()  # one series: the bar labels say it all
    fig.suptitle("Eleventh set, 2026-11-30: quest with 64-token pages (CPU pass key, NVIDIA H200 decode step)",
                 fontsize=10)
    save(fig, results / f"set15-{tag}.png", bottom=0.04)


PASSKEY_FILES = ("passkey-smollm2-cpu.json", "passkey-smollm2-cpu-gqa-max.json", "passkey-smollm2-cpu-gqa-mean-max.json",
                 "passkey-smollm2-cpu-mean-mass.json", "passkey-smollm2-cpu-gqa-mass.json",
                 "passkey-smollm2-cpu-gqa-zmax.json")
# 40 placements, quest at budget 2048: (label, file); the rank union is an experiment outside the product
PASSKEY_40 = (("sum", "passkey-smollm2-cpu-quest-40.json"), ("rank union\n(experiment)",
              "passkey-smollm2-cpu-quest-40-rank-union.json"), ("zmax", "passkey-smollm2-cpu-quest-40-zmax.json"))
REDUCES = (("sum", "tab:blue"), ("max", "tab:orange"), ("mass", "tab:green"), ("zmax", "tab:purple"))


def plot_accuracy(results: Path) -> None:
    """CPU accuracy (SmolLM2, page 32): pass-key hits and attention-output error per selector x budget x gqa_reduce."""
    err = load(results, "attention-error-smollm2-cpu.json")
    runs = [r for r in (load(results, n) for n in PASSKEY_FILES) if r is not None]
    if err is None or not runs:
        return
    hits, dense = {}, set()
    for r in runs:  # files before `gqa_reduce` existed summed; its field is one value or one per selector
        for name, acc in r["accuracy"].items():
            if name == "dense":
                dense.add(round(acc * r["placements"]))
                continue
            sel, budget = name.split("@")
            red = r.get("gqa_reduce", "sum")
            hits[sel, int(budget), red if isinstance(red, str) else red[sel]] = round(acc * r["placements"])
    groups = [(sel, b) for sel in ("cuboid_mean", "quest", "mean") for b in (1024, 2048)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(21, 5), gridspec_kw={"width_ratios": [3, 3, 1.2]})
    width = 0.2
    for i, (red, color) in enumerate(REDUCES):
        xs = [x + (i - 1.5) * width for x in range(len(groups))]
        vals = [hits.get((sel, b, red)) for sel, b in groups]
        bars = ax1.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width,
                       color=color, label=red)
        label_bars(ax1, bars, "{:.0f}", 7)
        e = err["relative_l2_error"]
        bars = ax2.bar(xs, [e[f"{sel}@{b}/{red}"]["mean"] for sel, b in groups], width, color=color, label=red)
        label_bars(ax2, bars, "{:.3f}", 6)
    forty = [(name, load(results, f)) for name, f in PASSKEY_40]
    forty = [(name, r) for name, r in forty if r is not None]
    if forty:
        n = forty[0][1]["placements"]
        names = ["dense"] + [name for name, _ in forty]
        vals = [round(forty[0][1]["accuracy"]["dense"] * n)] + [round(r["accuracy"]["quest@2048"] * n) for _, r in forty]
        bars = ax3.bar(range(len(vals)), vals, 0.6, color=["k", "tab:blue", "tab:gray", "tab:purple"][: len(vals)])
        label_bars(ax3, bars, "{:.0f}", 8)
        ax3.set_xticks(range(len(vals)))
        ax3.set_xticklabels(names, fontsize=7)
        ax3.set_ylim(0, n + 4)
        ax3.set_ylabel(f"pass key found (of {n} placements)")
        ax3.set_title(f"quest, budget 2048, {n} placements", fontsize=9)
    for d in sorted(dense):
        ax1.axhline(d, color="k", lw=0.8, ls="--", label=f"dense ({d})")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{sel}\nbudget {b}" for sel, b in groups], fontsize=8)
        ax.legend(fontsize=8, title="gqa_reduce", title_fontsize=8, ncol=4, loc="upper center")
    ax1.set_ylim(0, 23)
    ax1.set_ylabel(f"pass key found (of {runs[0]['placements']} placements)")
    ax1.set_title(f"Pass-key retrieval, {runs[0]['prompt_tokens']['max']:,}-token prompts (no bar: not run)", fontsize=9)
    ax2.set_ylim(0, 0.125)
    ax2.set_ylabel("attention-output relative L2 error (mean)")
    ax2.set_title("Sparse vs dense decode attention, last query of each layer", fontsize=9)
    fig.suptitle("SmolLM2-135M-Instruct on a CPU (page 32, sink 2 + recent 2 pages): defaults sum for cuboid_mean, "
                 "zmax for quest, mass for mean", fontsize=10)
    save(fig, results / "accuracy-smollm2-cpu.png")



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--date", default="2026-11-29")
    p.add_argument("--machine", default="NVIDIA H200")
    a = p.parse_args()
    results = Path(a.results)
    tag = f"h200-{a.date}"
    suffix = f"{a.machine}, {a.date}"
    for fn in (plot_decode, plot_decode_shapes, plot_h2d, plot_d2h, plot_e2e, plot_page_cache):
        fn(results, tag, suffix)
    plot_d2h(results, f"uva-{tag}", suffix)
    plot_e2e(results, tag, suffix, name="e2e-smoke-graphs")
    plot_offload(results, tag, suffix)
    plot_segmented(results, f"segmented-prefill-{tag}.json", f"segmented-load-{tag}.json",
                   f"segmented-prefill-{tag}.png", suffix)
    plot_segmented(results, f"segmented-prefill-{tag}-ring2.json", f"segmented-load-{tag}-decode-out-256.json",
                   f"segmented-prefill-{tag}-set8.png", f"{a.machine} (GPU 0 of an x2 machine), {a.date}")
    plot_set9(results, tag, suffix)
    plot_set10(results)
    plot_set11(results)
    plot_set12(results)
    plot_set13(results)
    plot_set14(results)
    plot_set15(results)
    plot_accuracy(results)


if __name__ == "__main__":
    main()
