"""Where a population step's time goes against the time the goal's model TFLOP/s allow (issue #6),
as a figure: the measured split of a K-trial, d 256 step's kernels (a
`windtunnel.bench.profile_step` log), and below it the bound: the least that step could take with
its GEMMs and attention as measured and SwiGLU, RMSNorm, AdamW and the cross-entropy's pass over
the logits moving only the bytes they must, at the GPU's copy bandwidth (the log's `copy
bandwidth` line, else --hbm-tbs).

    python -m windtunnel.bench.step_budget results/bench/profile_k64.log --hbm-tbs 4.8 --out results/bench/step_budget.png
    python -m windtunnel.bench.step_budget PROFILE.log --k 32 --population population.json --md budget.md

With --population (a windtunnel.bench.population table of the same GPU) it also says the one
number left: the measured model TFLOP/s of that K against the bound's (--md writes that
paragraph). CPU only: it reads the files and the model's shapes, nothing runs on a GPU.
"""
import argparse
import json
import re
from pathlib import Path

from windtunnel.config.trial import ModelConfig
from windtunnel.files import write_atomically, write_text
from windtunnel.model import count_params, flops_per_token

BF16, FP32 = 2, 4


def measured(log: Path) -> dict[str, float]:
    """ms per step of each kernel category: the lines after the profiler's table."""
    text = log.read_text()
    tail = text[text.index("Self CUDA time total"):]
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z][\w-]*)\s+([\d.]+) ms\s+[\d.]+%$", tail, re.M)}


def copy_tbs(log: Path) -> float | None:
    """The copy bandwidth profile_step measured beside the profile, TB/s (read + write)."""
    m = re.search(r"^copy bandwidth: ([\d.]+) GB/s", log.read_text(), re.M)
    return float(m[1]) / 1000 if m else None


def floors(cfg: ModelConfig, vocab: int, tokens: int, trials: int, tbs: float) -> dict[str, float]:
    """ms of each bandwidth-bound pass moving only the bytes it must (inputs read once, outputs
    written once), at tbs TB/s. The cross-entropy kernel reads each chunk's bf16 logits and writes
    their gradient over them (windtunnel/kernels/linear_cross_entropy.py)."""
    C, F, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
    swiglu = L * tokens * F * BF16 * (3 + 5)  # fwd: [gate | up] in, y out; bwd: [gate | up], dy in, dx out
    # 2 norms a layer and a final one; all but the first add a residual: fwd x, r in, h, y out; bwd dy,
    # dh, h in, dx and the residual's (scaled) gradient out. The first: x in, y out; dy, x in, dx out.
    norms = tokens * C * BF16 * ((2 * L) * 9 + 5)
    adamw = trials * count_params(cfg, vocab) * FP32 * 7  # p, grad, m, v read; p, m, v written
    ce = tokens * vocab * BF16 * 2
    return {k: b / tbs / 1e9 for k, b in (("swiglu", swiglu), ("rms_norm", norms), ("adamw", adamw),
                                          ("cross-entropy", ce))}


def measured_tflops(population: Path, d_model: int, k: int) -> float | None:
    """The population row (d_model, K) of a windtunnel.bench.population table (its .json)."""
    rows = json.loads(population.read_text())
    hit = [r for r in rows if r["name"] == "population" and r["d_model"] == d_model and r["trials"] == k and r["tflops"]]
    return hit[0]["tflops"] if hit else None


def gap(least_ms: float, flops: float, tflops: float | None, goal: float, device: str) -> str:
    """The paragraph that leaves one number: the bound's model TFLOP/s against the measured."""
    bound = flops / (least_ms / 1e3) / 1e12
    text = (f"Bound on {device}: {least_ms:.1f} ms a step = **{bound:.0f} model TFLOP/s** (GEMMs and attention at "
            f"their measured speed, the bandwidth-bound passes at the copy bandwidth); the goal of {goal:.0f} is "
            f"{'within' if bound >= goal else 'beyond'} it.")
    if tflops:
        text += (f" Measured: {tflops:.1f}. **The remaining gap: {bound - tflops:.0f} model TFLOP/s** "
                 f"({100 * (1 - tflops / bound):.0f}% of the step's time is above the bound).")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path, help="a `python -m windtunnel.bench.profile_step --d-model 256 --k 64` log")
    p.add_argument("--hbm-tbs", type=float, default=4.8,
                   help="bandwidth, TB/s, when the log has no copy bandwidth line (H200 4.8, H100 SXM 3.35)")
    p.add_argument("--goal", type=float, default=400.0, help="model TFLOP/s")
    p.add_argument("--k", type=int, default=64, help="trials in the profiled population (profile_step --k)")
    p.add_argument("--population", type=Path, help="a population.json of the same GPU: the measured TFLOP/s")
    p.add_argument("--device", default="this GPU", help="the GPU's name, for the paragraph")
    p.add_argument("--md", type=Path, help="write the bound's paragraph here too")
    p.add_argument("--out", type=Path, default=Path("step_budget.png"))
    a = p.parse_args(argv)
    tbs = copy_tbs(a.log) or a.hbm_tbs

    K, vocab = a.k, 16384
    cfg = ModelConfig(d_model=256, n_layers=8, head_dim=64, seq_len=512)
    tokens = K * 16 * cfg.seq_len
    budget = tokens * flops_per_token(cfg, vocab) / (a.goal * 1e12) * 1e3
    got = measured(a.log)
    least = {"gemm": got["gemm"], "attention": got["attention"], **floors(cfg, vocab, tokens, K, tbs)}
    print(f"budget {budget:.1f} ms; measured {sum(got.values()):.1f} ms; least possible {sum(least.values()):.1f} ms "
          f"({', '.join(f'{k} {v:.1f}' for k, v in least.items())})")
    text = gap(sum(least.values()), tokens * flops_per_token(cfg, vocab),
               measured_tflops(a.population, 256, K) if a.population else None, a.goal, a.device)
    print(text)
    if a.md:  # before the figure: a host without matplotlib still gets the number
        write_text(a.md, text + "\n")
    plot(a, got, least, budget, K, tokens, tbs)
    return 0


def plot(a, got: dict, least: dict, budget: float, K: int, tokens: int, tbs: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gemm": "#4c72b0", "attention": "#55a868", "cross-entropy": "#c44e52", "swiglu": "#8172b2",
              "rms_norm": "#ccb974", "adamw": "#64b5cd"}
    fig, ax = plt.subplots(figsize=(12, 3.6))
    for y, parts in ((1, got), (0, least)):
        left = 0.0
        for name, ms in parts.items():
            ax.barh(y, ms, left=left, color=colors.get(name, "#bbbbbb"), edgecolor="white",
                    hatch="//" if y == 0 and name not in ("gemm", "attention") else None,
                    label=name if y == 1 else None)
            if ms > 7:
                ax.text(left + ms / 2, y, f"{name}\n{ms:.1f}", ha="center", va="center", fontsize=7)
            left += ms
        ax.text(left + 1, y, f"{left:.0f} ms", va="center", fontsize=9)
    ax.axvline(budget, color="black", ls="--")
    ax.text(budget, 1.55, f"{a.goal:.0f} model TFLOP/s: {budget:.0f} ms", ha="center", fontsize=9)
    ax.set_yticks([1, 0], ["measured\n(profile)", "GEMMs, attention\nas measured; the\nrest at the copy\nbandwidth (hatched)"])
    ax.set_ylim(-0.6, 1.8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel(f"ms per step (K = {K} trials, d 256, 8 layers, {tokens:,} tokens; {tbs:.2f} TB/s)")
    ax.set_title(f"A population step against the time {a.goal:.0f} model TFLOP/s allows", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(a.out, lambda tmp: fig.savefig(tmp, dpi=130, format=a.out.suffix.lstrip(".") or "png"))
    print(f"-> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
