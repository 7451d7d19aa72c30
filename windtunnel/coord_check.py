"""The μP coordinate check (microsoft/mup's coord_check): train a few steps at several widths
and record, on one fixed batch, how far each activation has moved from its value at step 0.

Under μP the change of every activation stays the same size as width grows; in sp the logits'
change grows with width (Tensor Programs V, figure 5). Heads keep the base config's head dim,
so width adds heads.
"""
from __future__ import annotations

import torch

from windtunnel.config import TrialConfig, with_overrides
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
    """Rows {"parametrization", "width", "step", "layer", "value"}: mean |x_step - x_0|."""
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
            for step in range(1, steps + 1):
                pop.train_step(pop.lr_factors())
                for layer, x in _activations(pop, fixed).items():
                    rows.append({"parametrization": par, "width": width, "step": step, "layer": layer,
                                 "value": (x - x0[layer]).abs().mean().item()})
    return rows


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
    axes[0][0].set_ylabel("mean |x_t - x_0|")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
