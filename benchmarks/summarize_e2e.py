"""Summarise `e2e_serve.py` results: goal ratios per system, goodput, a Markdown table and a PNG.

    python benchmarks/summarize_e2e.py DIR [--finite-rate 0.2] [--commit SHA]

Reads `DIR/<system>.json` and each run's raw `vllm bench serve` JSON (per-request `itls`), and writes
`DIR/summary.json` and `DIR/e2e.png`, and prints the Markdown table. Ratios (all against dense, and against
native offload where it ran, measured in the same device call):
  throughput_vs_X        output tokens/s at saturation (rate inf), system / X            (goal >= 4 vs dense)
  ttft_reduction_vs_X    mean TTFT at `--finite-rate`, X / system                         (goal >= 10)
  tbt_vs_X               mean TPOT (TBT) at `--finite-rate`, system / X                   (goal <= 1.1)
  batch1_decode_vs_X     single-request decode speed, X's mean TPOT / system's           (goal >= 0.95)
Goodput: completed requests per second whose p99 inter-token latency is <= 25 x dense's single-request decode
iteration (mean batch-1 TPOT). The queueing-delay SLO cannot be separated from TTFT on the client side and is
not applied.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def goodput(raw: dict, slo_ms: float) -> float | None:
    itls = raw.get("itls")
    if not itls or not raw.get("duration"):
        return None
    ok = sum(1 for r in itls if r and p99(r) * 1000 <= slo_ms)
    return round(ok / raw["duration"], 4)


def ratio(a, b, digits=3):
    return round(a / b, digits) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--finite-rate", default=None, help="the rate at which TTFT/TBT are compared")
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    d = Path(a.dir)
    systems = {}
    for f in sorted(d.glob("*.json")):
        s = json.loads(f.read_text())
        if isinstance(s, dict) and "system" in s and "runs" in s:
            systems[f.stem] = s
    # baselines by system name: the tags carry a "-tp<N>" suffix for tensor-parallel runs
    by_system = {s["system"]: tag for tag, s in systems.items()}
    dense = systems.get(by_system.get("dense"))
    slo_ms = 25 * dense["runs"]["batch1"]["mean_tpot_ms"] if dense and "batch1" in dense["runs"] else None
    rates = sorted({k for s in systems.values() for k in s["runs"] if k.startswith("rate-")})
    finite = f"rate-{a.finite_rate}" if a.finite_rate else next((r for r in rates if r != "rate-inf"), None)
    for tag, s in systems.items():
        for key, run in s["runs"].items():
            raw_path = d / f"{tag}-{key.replace('rate-', 'rate')}.json"
            if slo_ms and raw_path.exists():
                run["goodput_req_s"] = goodput(json.loads(raw_path.read_text()), slo_ms)

    def get(tag, run, key):
        return ((systems.get(tag) or {}).get("runs", {}).get(run) or {}).get(key)

    goals = {}
    for tag in systems:
        if systems[tag]["system"] == "dense":
            continue
        g = {}
        for name in ("dense", "native-offload"):
            base = by_system.get(name)
            if base is None or base == tag:
                continue
            sfx = name.replace("-", "_")
            g[f"throughput_vs_{sfx}"] = ratio(get(tag, "rate-inf", "output_throughput"),
                                              get(base, "rate-inf", "output_throughput"))
            g[f"ttft_reduction_vs_{sfx}"] = ratio(get(base, finite, "mean_ttft_ms"), get(tag, finite, "mean_ttft_ms"))
            g[f"tbt_vs_{sfx}"] = ratio(get(tag, finite, "mean_tpot_ms"), get(base, finite, "mean_tpot_ms"))
            g[f"batch1_decode_vs_{sfx}"] = ratio(get(base, "batch1", "mean_tpot_ms"), get(tag, "batch1", "mean_tpot_ms"))
        goals[tag] = g
    model = next(iter(systems.values()))["model"] if systems else None
    tp = next(iter(systems.values())).get("tp", 1) if systems else 1
    summary = {"date": str(date.today()), "commit": a.commit, "model": model, "tp": tp, "finite_rate": finite,
               "goodput_tpot_slo_ms": slo_ms, "goals": goals,
               "systems": {t: {"startup_s": s.get("startup_s"), "error": s.get("error"),
                               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "command"}
                                        for k, v in s["runs"].items()}} for t, s in systems.items()}}
    (d / "summary.json").write_text(json.dumps(summary, indent=1))

    rows = ["| system | run | done | out tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | p99 TPOT ms | goodput req/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for tag, s in systems.items():
        for key, r in s["runs"].items():
            rows.append(f"| {tag} | {key} | {r.get('completed')} | {r.get('output_throughput') or 0:.0f} | "
                        f"{r.get('mean_ttft_ms') or 0:.0f} | {r.get('p99_ttft_ms') or 0:.0f} | "
                        f"{r.get('mean_tpot_ms') or 0:.1f} | {r.get('p99_tpot_ms') or 0:.1f} | "
                        f"{r.get('goodput_req_s')} |")
        if s.get("error"):
            rows.append(f"| {tag} | error | {s['error'][:120]!r} | | | | | | |")
    print("\n".join(rows))
    print(json.dumps(goals, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("output_throughput", "output tokens/s"), ("mean_ttft_ms", "mean TTFT (ms)"),
               ("mean_tpot_ms", "mean TPOT (ms)")]
    runs = ["batch1", *rates]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    width = 0.8 / max(len(systems), 1)
    for i, (key, label) in enumerate(metrics):
        ax = axes[i]
        for j, tag in enumerate(systems):
            vals = [get(tag, r, key) or 0 for r in runs]
            ax.bar([x + j * width for x in range(len(runs))], vals, width, label=tag)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(runs))], runs)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    gpus = "H200" if tp == 1 else f"{tp} x H200, tensor parallel {tp}"
    fig.suptitle(f"vllm serve + vllm bench serve, {model}, {gpus} ({summary['date']})")
    fig.tight_layout()
    fig.savefig(d / "e2e.png", dpi=110)


if __name__ == "__main__":
    main()
