"""Does the exported model compute what the run trained? Load `windtunnel export-hf`'s folder with
transformers (AutoModelForCausalLM, AutoTokenizer: no remote code) and compare its loss on the
run's held-out split with the run's own last validation loss (loss.jsonl).

    python -m windtunnel.bench.hf_check HF_DIR --run EXPORT_DIR [--tolerance 0.01]

EXPORT_DIR is `windtunnel transfer`'s --out (train.yaml, runs/<name>/loss.jsonl). The held-out
windows are the ones the run evaluated on (train.eval_tokens' windows from the start of the
validation split, whatever the world size), fed as token ids; the same text decoded and re-encoded by the
exported tokenizer is reported beside it (its windows differ: informative, not compared).
Prints one JSON line; exit 1 when the relative gap exceeds the tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("--run", required=True, help="`windtunnel transfer`'s --out folder the run was launched from")
    p.add_argument("--tolerance", type=float, default=0.01)
    args = p.parse_args(argv)

    from windtunnel import data as data_mod
    from windtunnel.config.overrides import load_yaml
    from windtunnel.hf import import_transformers
    from windtunnel.config.large_run import load_config
    from windtunnel.large_run import resolve_paths

    run_folder = Path(args.run)
    cfg, run = load_config(load_yaml(run_folder / "train.yaml"))
    cfg, run_dir, _, _ = resolve_paths(cfg, run, run_folder)
    log = [json.loads(line) for line in (run_dir / "loss.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in log if "val_loss" in r]
    shards = data_mod.load(cfg.data)
    windows = torch.from_numpy(shards.eval_windows(cfg.train.eval_tokens, cfg.model.seq_len))

    tf = import_transformers()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tf.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, trust_remote_code=False).to(dev)
    model.eval()
    tok = tf.AutoTokenizer.from_pretrained(args.hf_dir, trust_remote_code=False)

    @torch.no_grad()
    def loss(ws: torch.Tensor) -> float:
        total, count = 0.0, 0
        for w in ws.split(max(1, run.micro_batch)):
            w = w.to(dev)
            logits = model(w[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
        return total / count

    hf_loss = loss(windows)
    text = tok.decode(windows[:, :-1].flatten().tolist())
    ids = torch.tensor(tok(text)["input_ids"])
    T = cfg.model.seq_len
    retok = ids[: (len(ids) - 1) // T * T + 1]
    retok_windows = torch.stack([retok[i:i + T + 1] for i in range(0, len(retok) - T, T)]) if len(retok) > T else windows
    out = {"run_val_loss": vals[-1]["val_loss"] if vals else None, "run_val_step": vals[-1]["step"] if vals else None,
           "hf_loss": hf_loss, "hf_loss_retokenized_text": loss(retok_windows), "windows": int(windows.shape[0]),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "transformers": tf.__version__}
    out["relative_gap"] = abs(hf_loss - out["run_val_loss"]) / out["run_val_loss"] if vals else None
    out["ok"] = bool(vals) and math.isfinite(hf_loss) and out["relative_gap"] <= args.tolerance
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
