"""A trained model as a Hugging Face Llama folder that transformers, vLLM and lm-eval-harness load
with no remote code (`windtunnel export-hf`, windtunnel/commands/export_hf.py):

    model.safetensors               (model-0000i-of-0000n.safetensors + index past --max-shard-size)
    config.json                     model_type llama (llama_config: also `windtunnel transfer`'s)
    generation_config.json          bos/eos
    tokenizer.json, tokenizer_config.json

windtunnel's decoder is Llama's (RMSNorm, rotate-half RoPE with theta^(-2i/D), SwiGLU, no biases)
plus MiniCPM's μP forward multipliers, which Llama lacks. They are linear, so they are folded into
the weights, taking their values from windtunnel/parametrization.py:
    embed_tokens = wte × scale_emb
    o_proj, down_proj = wo, w_down × scale_depth / sqrt(n_layers)   (each residual branch's output)
    lm_head = head ÷ (d_model / dim_model_base)
A tied head stays tied only where the embedding's and the head's factors agree (sp); otherwise the
two are written untied.

bos = eos = `<|endoftext|>`. The training data has no document marker, so the token takes the id
of a byte no text holds (a control byte, NUL first) that no BPE merge uses: the vocabulary keeps
its size and the model its rows. That byte can no longer be encoded (it is dropped).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch

from windtunnel import parametrization as mup
from windtunnel.config.trial import ModelConfig

EOS = "<|endoftext|>"
# Control bytes absent from text, in the order they are tried for EOS (not \t \n \v \f \r)
SPARE_BYTES = (0, *range(1, 9), *range(14, 32), 127)


def _clean(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(f"{x:.12g}")


def tied(mc: ModelConfig) -> bool:
    """Whether the export keeps the head tied: only if folding gives both the same factor."""
    m = mup.model_multipliers(mc)
    return mc.tie_embeddings and math.isclose(m.embedding, m.logit, rel_tol=1e-12)


def llama_config(mc: ModelConfig, vocab_size: int, eos_id: int | None = None, dtype: str = "float32") -> dict:
    """The config.json of the folded model. The μP multipliers are kept for the record under
    `windtunnel`: they are already in the weights and must not be applied again."""
    m = mup.model_multipliers(mc)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": mc.d_model,
        "intermediate_size": mc.ffn_dim,
        "num_hidden_layers": mc.n_layers,
        "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.n_heads,
        "head_dim": mc.d_model // mc.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": mc.seq_len,
        "rms_norm_eps": mc.norm_eps,
        # transformers 5 reads rope_parameters; older releases and vLLM read rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "rope_theta": mc.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": mc.init_std,
        "tie_word_embeddings": tied(mc),
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype,
        "windtunnel": {"parametrization": mc.parametrization, "folded_into_weights": True,
                       "scale_emb": _clean(m.embedding), "depth_scaling": mc.depth_scaling,
                       "scale_depth": _clean(m.residual * (math.sqrt(mc.n_layers) if mc.depth_scaling == "sqrt" else 1)),
                       "dim_model_base": _clean(mc.d_model * m.logit)},
    }


def fold(w: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """One trial's weights (windtunnel names, no population axis) -> Llama's names, μP folded in."""
    m = mup.model_multipliers(mc)
    C, F = mc.d_model, mc.ffn_dim
    out = {"model.embed_tokens.weight": w["wte"] * m.embedding, "model.norm.weight": w["norm"]}
    for i in range(mc.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = w[p + "attn_norm"]
        out[q + "post_attention_layernorm.weight"] = w[p + "mlp_norm"]
        wq, wk, wv = w[p + "attn.wqkv"].split(C)  # rows [q; k; v], head-major as Llama's
        out.update({q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
                    q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": w[p + "attn.wo"] * m.residual})
        gate, up = w[p + "mlp.w_gate_up"].split(F)  # rows [gate; up]
        out.update({q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up,
                    q + "mlp.down_proj.weight": w[p + "mlp.w_down"] * m.residual})
    if not tied(mc):
        out["lm_head.weight"] = w.get("lm_head", w["wte"]) * m.logit
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------- tokenizer


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which tokenizers' ByteLevel uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def tokenizer_json(tokenizer: str, bpe_file: Path | None = None) -> tuple[str, int]:
    """(tokenizer.json text, EOS id) for the data's tokenizer: 'byte' (id = the byte) or 'bpe'
    (the tokenizer.json `windtunnel data prepare` trained). EOS takes a spare byte's id (module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = _byte_chars()
    if tokenizer == "byte":
        vocab, merges = {chars[b]: b for b in range(256)}, []
    else:
        d = json.loads(Path(bpe_file).read_text())
        vocab, merges = dict(d["model"]["vocab"]), d["model"]["merges"]
    in_merges = {part for m in merges for part in (m.split(" ") if isinstance(m, str) else m)}
    spare = next((b for b in SPARE_BYTES if chars[b] in vocab and chars[b] not in in_merges), None)
    if spare is None:
        from windtunnel.errors import ConfigError

        raise ConfigError("tokenizer: every control byte is merged or missing: no id is free for <|endoftext|>")
    eos = vocab.pop(chars[spare])
    vocab[EOS] = eos
    if tokenizer == "byte":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        d["model"]["vocab"] = vocab
        tok = Tokenizer.from_str(json.dumps(d))
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    if tok.token_to_id(EOS) != eos:  # an added token past the vocabulary would index past the embedding
        raise RuntimeError(f"{EOS} got id {tok.token_to_id(EOS)}, not {eos}")
    return tok.to_str(), eos


def tokenizer_config(seq_len: int) -> dict:
    """No token is added to the text: the model was trained on plain windows."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
            "add_bos_token": False, "add_eos_token": False, "model_max_length": seq_len,
            "clean_up_tokenization_spaces": False}


# ------------------------------------------------------------------------------------ writing


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into shards of at most max_bytes (a bigger tensor is a shard of its own)."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def import_transformers():
    """transformers, imported so that its `import kernels` (the PyPI package of that name) finds
    that package and not this checkout's kernels/ folder (installed as windtunnel.kernels), which
    shadows it wherever the checkout's root is on sys.path (`python -m` from the root, PYTHONPATH)."""
    import windtunnel.kernels as own

    own_dir = Path(own.__file__).resolve().parent
    shadow = [p for p in sys.path if (Path(p or ".").resolve() / "kernels").resolve() == own_dir]
    if shadow and getattr(sys.modules.get("kernels"), "__file__", None) and \
            Path(sys.modules["kernels"].__file__).resolve().parent == own_dir:
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in shadow]
    try:
        import transformers
        import transformers.integrations.hub_kernels  # noqa: F401  (the module that imports `kernels`)
    finally:
        sys.path[:] = saved
    return transformers


# ------------------------------------------------------------------------------------ sources


def _config_error(msg: str):
    from windtunnel.errors import ConfigError

    return ConfigError(msg)


def _trial_state(path: Path, step: int | None, trial: int | None):
    """(TrialConfig, weights, description) of one trial in a trainer's saved state (.pt)."""
    from windtunnel.config.trial import trial_from_dict

    try:
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a pickle or zip error: one line naming the file
        raise _config_error(f"SOURCE: {path} is not a state saved by windtunnel's trainer "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None
    if not isinstance(s, dict) or not {"configs", "model", "step"} <= s.keys():
        raise _config_error(f"SOURCE: {path} is not a state saved by windtunnel's trainer (no configs, model, step)")
    if step is not None and int(s["step"]) != step:
        raise _config_error(f"--step: {path} holds step {s['step']}, not {step}")
    n = len(s["configs"])
    if trial is None and n > 1:
        raise _config_error(f"--trial: {path} holds {n} trials; name one (0..{n - 1})")
    k = trial or 0
    live = list(s.get("live", range(n)))
    if not 0 <= k < n or k not in live:
        raise _config_error(f"--trial: must be one of {', '.join(map(str, live))} (got {k})")
    slot = live.index(k)
    cfg = trial_from_dict(s["configs"][k])
    return cfg, {name: t[slot] for name, t in s["model"].items()}, f"{path} (step {s['step']}, trial {k})"


def _checkpoints(folder: Path) -> Path | None:
    """The large run's checkpoint folder that `folder` is or holds (run_dir, export folder)."""
    from windtunnel import run_checkpoints

    for c in (folder, folder / "checkpoints"):
        if (c / run_checkpoints.LATEST).is_file():
            return c
    if (folder / "train.yaml").is_file():  # `windtunnel transfer`'s folder: its run, where train.yaml puts it
        from windtunnel.config.overrides import load_yaml
        from windtunnel.config.large_run import load_config
        from windtunnel.large_run import resolve_paths

        ckpt = resolve_paths(*load_config(load_yaml(folder / "train.yaml")), folder)[2]
        return ckpt if (ckpt / run_checkpoints.LATEST).is_file() else None
    return None


def _saved_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - not a trainer's state: no step of it is asked for
        return -1


def _large_run_checkpoint(folder: Path, step: int | None) -> Path:
    if (folder / "meta.json").is_file():
        if step is not None and int(json.loads((folder / "meta.json").read_text())["step"]) != step:
            raise _config_error(f"--step: {folder} is the checkpoint of step "
                                f"{json.loads((folder / 'meta.json').read_text())['step']}, not {step}")
        return folder
    stable = sorted(folder.glob("stable-*.pt"), key=lambda f: int(f.stem[7:]) if f.stem[7:].isdigit() else -1)
    states = stable + ([folder / "latest.pt"] if (folder / "latest.pt").is_file() else [])
    if states:  # a trainer's checkpoint_dir: its latest state, or the one (stable saves too) of --step
        if step is None:
            return states[-1]
        by_step = {_saved_step(f): f for f in states}
        if step not in by_step:
            raise _config_error(f"--step: {folder} holds no state of step {step} (it holds: "
                                f"{', '.join(map(str, sorted(by_step)))})")
        return by_step[step]
    ckpt_dir = _checkpoints(folder)
    if ckpt_dir is None:
        raise _config_error(f"SOURCE: {folder} holds no checkpoint (allowed: a trial's .pt, a large run's folder "
                            "or its checkpoints folder, one checkpoint folder holding meta.json)")
    from windtunnel import run_checkpoints

    if step is None:
        return run_checkpoints.latest(ckpt_dir) or ckpt_dir
    steps = run_checkpoints.by_step(ckpt_dir)
    if step not in steps:
        raise _config_error(f"--step: {ckpt_dir} holds no checkpoint of step {step} "
                            f"(it holds: {', '.join(map(str, steps)) or 'none'})")
    return steps[step]


def _dcp_state(ckpt: Path):
    """(TrialConfig, weights, description) of a large run's checkpoint (torch.distributed.checkpoint),
    read in this one process (no process group: DCP reads every shard)."""
    from windtunnel import checkpoints
    from windtunnel.config.trial import trial_from_dict
    from windtunnel.model import Transformer

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = trial_from_dict(meta["config"])
    shapes = checkpoints.dcp_metadata(ckpt, "SOURCE").state_dict_metadata  # by allow-list: runs no code
    if "model.wte" not in shapes:
        raise _config_error(f"SOURCE: {ckpt} holds no model weights of `windtunnel train`")
    with torch.device("meta"):
        model = Transformer(cfg.model, shapes["model.wte"].size[1], population=1)
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        checkpoints.dcp_load({"model": state}, ckpt, "SOURCE")  # weights_only, as every state
    return cfg, {k: v[0] for k, v in state.items()}, f"{ckpt} (step {meta['step']})"


def load_source(source: str | Path, step: int | None = None, trial: int | None = None):
    """(TrialConfig, one trial's weights without the population axis, description) of SOURCE."""
    path = Path(source).expanduser()
    if not path.exists():
        raise _config_error(f"SOURCE: no such file or folder {path}")
    if path.is_dir():
        path = _large_run_checkpoint(path, step)
    if path.is_file():
        cfg, w, what = _trial_state(path, step, trial)
    else:
        if trial:
            raise _config_error(f"--trial: {path} is a large run's checkpoint (one model); leave --trial out")
        cfg, w, what = _dcp_state(path)
    m = mup.model_multipliers(cfg.model)  # the buffers a checkpoint carries must be the config's rules
    for name, want in (("emb_mult", m.embedding), ("res_mult", m.residual), ("logit_mult", m.logit)):
        if name in w and not math.isclose(float(w[name]), want, rel_tol=1e-5):
            raise _config_error(f"SOURCE: {what}: its {name} {float(w[name])} is not its config's {want}")
    return cfg, {k: v for k, v in w.items() if not k.endswith("_mult")}, what


def bpe_file(cfg, given: str | None) -> Path:
    """The tokenizer.json of a BPE-trained run: --tokenizer, or the one beside its shards."""
    from windtunnel.data import shard_dir

    path = Path(given).expanduser() if given else shard_dir(cfg.data) / "tokenizer.json"
    if not path.is_file():
        raise _config_error(f"--tokenizer: no tokenizer.json at {path} (the run's data.source "
                            f"{cfg.data.source} is not prepared on this machine); give the file")
    return path


# ------------------------------------------------------------------------------------- export


def export(source: str | Path, out: str | Path, *, step: int | None = None, trial: int | None = None,
           dtype: str = "float32", max_shard_bytes: int = 5 * 2**30, tokenizer: str | None = None) -> list[Path]:
    """Write SOURCE's model into out as a Llama folder (module doc); returns the files written.
    Each file is written to a temp name and renamed; an earlier export's other shards go last."""
    from safetensors.torch import save_file

    from windtunnel.files import check_folder, make_folder, write_atomically

    out = Path(out)
    check_folder("--out", out)
    cfg, w, what = load_source(source, step, trial)
    vocab = w["wte"].shape[0]
    tok_text, eos = tokenizer_json(cfg.data.tokenizer, bpe_file(cfg, tokenizer) if cfg.data.tokenizer == "bpe" else None)
    n_tok = len(json.loads(tok_text)["model"]["vocab"])
    if n_tok > vocab:
        raise _config_error(f"--tokenizer: it holds {n_tok} tokens; the model only {vocab}")
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in fold(w, cfg.model).items()}
    pieces = shard(tensors, max_shard_bytes)
    names = ["model.safetensors"] if len(pieces) == 1 else \
        [f"model-{i + 1:05d}-of-{len(pieces):05d}.safetensors" for i in range(len(pieces))]
    texts = {
        "config.json": llama_config(cfg.model, vocab, eos, dtype),
        "generation_config.json": {"bos_token_id": eos, "eos_token_id": eos, "max_length": cfg.model.seq_len},
        "tokenizer_config.json": tokenizer_config(cfg.model.seq_len),
    }
    if len(pieces) > 1:
        texts["model.safetensors.index.json"] = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: n for n, p in zip(names, pieces) for k in p}}
    make_folder("--out", out)
    written = []
    for name, piece in zip(names, pieces):
        write_atomically(out / name, lambda tmp, piece=piece: save_file(piece, str(tmp), metadata={"format": "pt"}))
        written.append(out / name)
    for name, obj in texts.items():
        write_atomically(out / name, lambda tmp, obj=obj: tmp.write_text(json.dumps(obj, indent=2) + "\n"))
        written.append(out / name)
    write_atomically(out / "tokenizer.json", lambda tmp: tmp.write_text(tok_text))
    written.append(out / "tokenizer.json")
    for old in out.glob("model*.safetensors*"):  # an earlier export's shards, not this one's
        if old not in written:
            old.unlink()
    print(f"export-hf: {what} -> {out} ({len(names)} safetensors file(s), {dtype}, vocab {vocab})", file=sys.stderr)
    return written


def eos_id(cfg) -> int | None:
    """The EOS id an export of a run of cfg will have; None where its BPE tokenizer is not on this machine."""
    try:
        return tokenizer_json(cfg.data.tokenizer, bpe_file(cfg, None) if cfg.data.tokenizer == "bpe" else None)[1]
    except (OSError, ValueError):
        return None
