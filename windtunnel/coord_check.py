"""The μP coordinate check (microsoft/mup's coord_check): train a few steps at several widths
and record, on one fixed batch, how far each activation has moved from its value at step 0.

Under μP the change of every activation stays the same size as width grows; in sp the logits'
change grows with width (Tensor Programs V, figure 5). The sizes at init are recorded too: a
hidden init not scaled with width moves nothing the changes show. Heads keep the base config's
head dim, so width adds heads.
"""
from __future__ import annotations

import torch

from windtunnel.config.trial import TrialConfig, with_overrides
from windtunnel.errors import ConfigError
from windtunnel.trainer import Population

DEFAULT_LR = 0.01  # MiniCPM's μP lr
SP_INIT_STD = 0.02  # sp's conventional init (GPT-2, Llama); μP keeps the base config's (MiniCPM: 0.1)


@torch.no_grad()
def _activations(pop: Population, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    emb, blocks, _ = pop.model.hidden_states(idx)
    acts = {"embedding": emb}
    acts.update({f"block.{i}": h for i, h in enumerate(blocks)})
    acts["logits"] = pop.model.logits(idx)
    return {k: v.float() for k, v in acts.items()}


def coord_check(base: TrialConfig, widths: list[int], steps: int = 5, lr: float | None = None,
                parametrizations: tuple[str, ...] | list[str] = ("sp", "mup"),
                sp_init_std: float = SP_INIT_STD) -> list[dict]:
    """Rows {"parametrization", "width", "step", "layer", "value"}: at step 0 the activation's size
    mean |x_0|, at step t >= 1 its change mean |x_t - x_0|."""
    head_dim = base.model.d_model // base.model.n_heads
    for width in widths:  # all of them before any trains, and the error names the width
        try:
            with_overrides(base, {"model.d_model": width, "model.head_dim": head_dim})
        except ConfigError as e:
            raise ConfigError(f"--widths: {width}: {e}") from None
    rows = []
    for par in parametrizations:
        for width in widths:
            cfg = with_overrides(base, {
                "model.parametrization": par, "model.d_model": width, "model.head_dim": head_dim,
                "optim.lr": lr or DEFAULT_LR,
                "model.init_std": sp_init_std if par == "sp" else base.model.init_std, "schedule.kind": "constant", "schedule.warmup": 0.0,
                "train.tokens": steps * base.train.batch_size * base.model.seq_len, "train.device": "cpu",
                "train.compile": False})
            pop = Population([cfg])
            fixed = pop.val[: cfg.train.batch_size, :-1].unsqueeze(0)  # one fixed batch (1, B, T)
            x0 = _activations(pop, fixed)
            rows += [{"parametrization": par, "width": width, "step": 0, "layer": layer, "value": x.abs().mean().item()}
                     for layer, x in x0.items()]
            for step in range(1, steps + 1):
                pop.train_step(pop.lr_factors())
                for layer, x in _activations(pop, fixed).items():
                    rows.append({"parametrization": par, "width": width, "step": step, "layer": layer,
                                 "value": (x - x0[layer]).abs().mean().item()})
    return rows


# How far μP may drift between the narrowest and widest width (ratio widest / narrowest). A
# correct μP, the tiny model over 8x width: sizes at init 0.85-1.04 (logits 0.36 = 1/sqrt(8), as
# they should), changes 0.30-1.1 (the least at widths 32 -> 256, 1 to 10 steps). A broken rule
# leaves a band: hidden lr not divided by m moves the blocks 28x, an embedding lr divided by m
# 0.13x; a logit multiplier 1/sqrt(m) keeps the logits' init size (1.0x); sp's logits move 4.7x.
SIZE_BAND = 2.0
CHANGE_BAND = 4.0


def mup_violations(rows: list[dict]) -> list[str]:
    """What breaks μP in the rows (empty if nothing): every activation's change at the last step
    stays within CHANGE_BAND across widths, its size at init within SIZE_BAND; the logits' size at
    init shrinks as 1/sqrt(width) (the LM head's inputs sum over width, its multiplier is 1/m)."""
    mup = [r for r in rows if r["parametrization"] == "mup"]
    if not mup:
        return []
    widths = sorted({r["width"] for r in mup})
    if len(widths) < 2:
        return []
    last = max(r["step"] for r in mup)
    at = {(r["step"], r["layer"], r["width"]): r["value"] for r in mup}
    out = []
    for layer in dict.fromkeys(r["layer"] for r in mup):
        for step, band, what in ((0, SIZE_BAND, "size at init"), (last, CHANGE_BAND, f"change by step {last}")):
            lo, hi = at[(step, layer, widths[0])], at[(step, layer, widths[-1])]
            ratio = hi / lo if lo else float("inf")
            expect = (widths[-1] / widths[0]) ** -0.5 if (step, layer) == (0, "logits") else 1.0
            if not 1 / band <= ratio / expect <= band:
                out.append(f"{layer}: {what} {ratio:.3g}x from width {widths[0]} to {widths[-1]} "
                           f"(μP: {expect:.3g}x within {band:g}x)")
    return out


def summary(rows: list[dict]) -> str:
    """A table of the last step: one line per (parametrization, layer), one column per width."""
    last = max(r["step"] for r in rows)
    widths = sorted({r["width"] for r in rows})
    lines = [f"{'param':<6}{'layer':<10}" + "".join(f"{w:>11}" for w in widths) + "   ratio max/min width"]
    keys = dict.fromkeys((r["parametrization"], r["layer"]) for r in rows)
    for par, layer in keys:
        vals = {r["width"]: r["value"] for r in rows
                if r["parametrization"] == par and r["layer"] == layer and r["step"] == last}
        ratio = vals[widths[-1]] / vals[widths[0]] if vals[widths[0]] else float("inf")
        lines.append(f"{par:<6}{layer:<10}" + "".join(f"{vals[w]:>11.4g}" for w in widths) + f"   {ratio:.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    from windtunnel.plots_fits import pyplot, save_figure

    plt = pyplot()
    pars = list(dict.fromkeys(r["parametrization"] for r in rows))
    last = max(r["step"] for r in rows)
    fig, axes = plt.subplots(1, len(pars), figsize=(5 * len(pars), 4), squeeze=False, sharey=True)
    for ax, par in zip(axes[0], pars):
        for layer in dict.fromkeys(r["layer"] for r in rows):
            pts = sorted((r["width"], r["value"]) for r in rows
                         if r["parametrization"] == par and r["layer"] == layer and r["step"] == last)
            ax.plot(*zip(*pts), marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="width (d_model)", title=f"{par}: step {last}")
        ax.set_xticks([w for w, _ in pts], [str(w) for w, _ in pts])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log-axis minor labels sat on the widths
    axes[0][0].set_ylabel("mean |x_t - x_0|")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
