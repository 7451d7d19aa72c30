"""`windtunnel export-hf`: transformers' Llama, loaded from the export with no remote code, gives the
project's own logits (fp32, CPU) for trial states and large-run checkpoints; bad input is exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from windtunnel.config.trial import DataConfig, ModelConfig, TrainConfig, TrialConfig, to_dict
from windtunnel.model import Transformer

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from windtunnel import hf  # noqa: E402

transformers = hf.import_transformers()

# Multipliers far from 1, a large eps and an unusual RoPE theta: a dropped or misplaced factor, a
# norm eps or RoPE convention that differs from Llama's, each moves the logits well past the tolerance.
MC = dict(d_model=64, n_layers=3, n_heads=4, seq_len=24, kernels="torch", dim_model_base=16, init_std=0.3,
          scale_emb=7.0, scale_depth=3.0, norm_eps=0.05, rope_theta=500.0)


def trained_like(cfg: TrialConfig, vocab: int = 256, K: int = 1, seed: int = 0) -> Transformer:
    """A model whose weights are all distinct from their init (norm weights included)."""
    model = Transformer(cfg.model, vocab, population=K)
    g = torch.Generator().manual_seed(seed)
    for k in range(K):
        model.init_trial(k, cfg.model, g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # norm weights: (K, C)
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def save_trial_state(path: Path, cfgs: list[TrialConfig], model: Transformer, step: int = 5) -> None:
    torch.save({"step": step, "configs": [to_dict(c) for c in cfgs], "model": model.state_dict(), "opt": {},
                "rngs": [None] * len(cfgs), "live": list(range(len(cfgs))), "status": ["ok"] * len(cfgs)}, path)


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    m.eval()
    with torch.no_grad():
        return m(idx).logits


def own_logits(model: Transformer, idx: torch.Tensor, k: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(idx[None].expand(model.K, *idx.shape).contiguous())[k].view(*idx.shape, -1)


def check_close(got, want):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * scale, f"max |logit difference| {err:.3g} (logits up to {scale:.3g})"


@pytest.mark.parametrize("param, tie", [("mup", True), ("mup", False), ("sp", True)])
def test_transformers_logits_equal_the_models(tmp_path, param, tie):
    """Catches any folding error: a multiplier dropped, doubled or put on the wrong weight (embedding,
    o_proj, down_proj, head), a tied head kept tied where the embedding and head factors differ, q/k/v
    or gate/up split in the wrong order, RoPE or RMSNorm (eps) unlike Llama's. Also: the folder loads
    with AutoConfig/AutoTokenizer, no remote code, and sp stays tied."""
    cfg = TrialConfig(model=ModelConfig(**MC, parametrization=param, tie_embeddings=tie))
    model = trained_like(cfg)
    save_trial_state(tmp_path / "latest.pt", [cfg], model)
    out = tmp_path / "hf"
    hf.export(tmp_path / "latest.pt", out)
    conf = transformers.AutoConfig.from_pretrained(out)
    assert conf.model_type == "llama" and conf.tie_word_embeddings == (tie and param == "sp")
    idx = torch.randint(0, 256, (2, MC["seq_len"]), generator=torch.Generator().manual_seed(1))
    check_close(hf_logits(out, idx), own_logits(model, idx))


def test_byte_tokenizer_ids_are_the_bytes_and_eos_is_a_spare_byte(tmp_path):
    """AutoTokenizer gives the training data's ids (raw bytes), adds no bos, has bos = eos = the NUL
    byte's id; the model's vocabulary keeps its size. Catches a tokenizer that shifts ids or adds tokens."""
    cfg = TrialConfig(model=ModelConfig(**MC))
    save_trial_state(tmp_path / "s.pt", [cfg], trained_like(cfg))
    hf.export(tmp_path / "s.pt", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x ** 2  # é\n"
    assert tok(text)["input_ids"] == list(text.encode())
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.bos_token == hf.EOS and tok.eos_token_id == 0
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert gen["eos_token_id"] == conf["eos_token_id"] == 0 and conf["vocab_size"] == 256


def test_bpe_tokenizer_keeps_the_trained_ids(tmp_path):
    """A BPE run's export encodes text as `windtunnel data prepare`'s tokenizer did (the EOS id a
    control byte's, no merge's). Catches an export that retrains, reorders or appends tokens."""
    from tokenizers import Tokenizer

    from windtunnel.data import prepare

    src = tmp_path / "text.txt"
    src.write_text("".join(f"def function_{i}(a, b):\n    return a * {i} + b\n" for i in range(400)))
    shards = prepare(str(src), tmp_path / "shards", tokenizer="bpe", vocab_size=400)
    cfg = TrialConfig(model=ModelConfig(**MC), data=DataConfig(source=str(shards), tokenizer="bpe", vocab_size=400))
    vocab = Tokenizer.from_file(str(shards / "tokenizer.json")).get_vocab_size()
    save_trial_state(tmp_path / "s.pt", [cfg], trained_like(cfg, vocab=vocab))
    hf.export(tmp_path / "s.pt", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    line = "def function_7(a, b):\n"
    assert tok(line)["input_ids"] == Tokenizer.from_file(str(shards / "tokenizer.json")).encode(line).ids
    assert tok.eos_token_id < vocab and tok.convert_ids_to_tokens(tok.eos_token_id) == hf.EOS


def test_population_state_and_sharding(tmp_path):
    """--trial picks one trial of a population's state (its own slice of every weight), and a small
    --max-shard-size writes shards with an index that transformers loads. Catches a slice taken from
    the wrong trial, a shard left out of the index."""
    cfgs = [TrialConfig(model=ModelConfig(**{**MC, "scale_emb": s}), train=TrainConfig(seed=s)) for s in (3, 9)]
    model = trained_like(cfgs[0], K=2)
    with torch.no_grad():
        model.init_trial(1, cfgs[1].model, torch.Generator().manual_seed(5))
    save_trial_state(tmp_path / "pop.pt", cfgs, model)
    r = cli("export-hf", tmp_path / "pop.pt", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--trial" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    hf.export(tmp_path / "pop.pt", tmp_path / "hf", trial=1, max_shard_bytes=100_000)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    check_close(hf_logits(tmp_path / "hf", idx), own_logits(model, idx, k=1))
    hf.export(tmp_path / "pop.pt", tmp_path / "hf", trial=0)  # re-export, one file: the old shards go
    assert sorted(p.name for p in (tmp_path / "hf").glob("model*")) == ["model.safetensors"]


def large_run_folder(tmp_path: Path, model: Transformer, cfg: TrialConfig, steps=(4, 8)) -> Path:
    """A large run's checkpoints laid out as windtunnel/run_checkpoints.py saves them (DCP, meta.json, latest)."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "runs" / "r"
    for s in steps:
        d = run / "checkpoints" / f"step-{s:09d}"
        with torch.no_grad():
            model.wte.add_(0.1)  # each step's weights differ
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(d))
        (d / "meta.json").write_text(json.dumps({"step": s, "tokens": s * 64, "world": 1, "config": to_dict(cfg)}))
    (run / "checkpoints" / "latest").write_text(f"step-{steps[-1]:09d}\n")
    return run


def test_large_run_folder_latest_and_step(tmp_path):
    """A large run's folder exports its latest checkpoint, --step N the step's. Catches a step
    ignored (latest exported instead) and a DCP read that leaves weights unloaded."""
    cfg = TrialConfig(model=ModelConfig(**MC, tie_embeddings=False))
    model = trained_like(cfg)
    run = large_run_folder(tmp_path, model, cfg)
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    want_latest = own_logits(model, idx)
    hf.export(run, tmp_path / "latest")
    check_close(hf_logits(tmp_path / "latest", idx), want_latest)
    with torch.no_grad():
        model.wte.sub_(0.1)  # step 4's weights
    hf.export(run / "checkpoints", tmp_path / "step4", step=4)
    check_close(hf_logits(tmp_path / "step4", idx), own_logits(model, idx))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_bad_input_is_exit_2_and_one_line(tmp_path):
    """A folder with no checkpoint, a step that does not exist, an --out that is a file: exit 2 and one
    line naming SOURCE, --step, --out (not a traceback, not an empty folder of files)."""
    cfg = TrialConfig(model=ModelConfig(**MC))
    run = large_run_folder(tmp_path, trained_like(cfg), cfg)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [((tmp_path / "empty", "--out", tmp_path / "o"), "SOURCE:"),
             ((run, "--step", 5, "--out", tmp_path / "o"), "--step:"),
             ((run, "--out", tmp_path / "file"), "--out:"),
             ((tmp_path / "file", "--out", tmp_path / "o"), "SOURCE:")]
    for args, field in cases:
        r = cli("export-hf", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and field in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists()


def test_transfer_config_is_the_exports(tmp_path):
    """`windtunnel transfer`'s config.json is the one export-hf writes for the trained run (token ids
    aside, which the tokenizer fixes): catches the two drifting apart (a MiniCPM config again)."""
    cfg = TrialConfig(model=ModelConfig(**MC))
    save_trial_state(tmp_path / "s.pt", [cfg], trained_like(cfg))
    hf.export(tmp_path / "s.pt", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    planned = hf.llama_config(cfg.model, 256)
    assert {k: v for k, v in exported.items() if not k.endswith("token_id")} == \
           {k: v for k, v in planned.items() if not k.endswith("token_id")}


def test_trainer_folder_latest_and_stable_by_step(tmp_path):
    """A trainer's checkpoint_dir: latest.pt by default, a stable save by --step. Catches --step
    ignored for .pt states, and stable saves ordered as text (stable-1000 before stable-200)."""
    from safetensors.torch import load_file

    cfg = TrialConfig(model=ModelConfig(**MC))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    models = {}
    for name, step, seed in (("stable-200.pt", 2, 1), ("stable-1000.pt", 10, 2), ("latest.pt", 12, 3)):
        models[step] = trained_like(cfg, seed=seed)
        save_trial_state(ckpt / name, [cfg], models[step], step=step)

    def embedding(step):
        return models[step].wte[0].detach() * cfg.model.scale_emb

    hf.export(ckpt, tmp_path / "latest")
    torch.testing.assert_close(load_file(tmp_path / "latest" / "model.safetensors")["model.embed_tokens.weight"], embedding(12))
    hf.export(ckpt, tmp_path / "s", step=10)
    torch.testing.assert_close(load_file(tmp_path / "s" / "model.safetensors")["model.embed_tokens.weight"], embedding(10))
    (ckpt / "latest.pt").unlink()
    hf.export(ckpt, tmp_path / "newest")  # no latest.pt: the newest stable save
    torch.testing.assert_close(load_file(tmp_path / "newest" / "model.safetensors")["model.embed_tokens.weight"], embedding(10))
