"""Hugging Face Llama checkpoints in a local directory: ``load_pretrained`` / ``save_pretrained``.

A directory holds ``config.json`` and ``model.safetensors`` (or sharded ``model-0000x-of-0000y``
files listed in ``model.safetensors.index.json``). No hub access: the path must exist locally.
Tensor names are Hugging Face's with the leading ``model.`` removed (see ``llama.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .llama import Llama
from ..run.rundir import as_if_opened

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ELSEWHERE = ("; any transformers model runs sequence-parallel through ringrt.hf "
              "(import ringrt.hf; AutoModelForCausalLM.from_pretrained(path, attn_implementation='ringrt'))")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} (rope scaling) is not supported by ringrt's Llama; valid: 'default'{_ELSEWHERE}")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` dict; ValueError for what ringrt cannot run."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type={hf.get('model_type')!r} is not supported by ringrt's Llama; valid: 'llama'{_ELSEWHERE}")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"{key}={hf[key]!r} is not supported by ringrt's Llama; valid: {ok!r}{_ELSEWHERE}")
    try:
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]), n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"), intermediate_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]!r}, which a Llama config needs") from None
    cfg.validate()
    return cfg


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False, "mlp_bias": False, "dtype": str(dtype).removeprefix("torch."),
    }


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint path {str(p)!r} is not a directory (expected config.json + model.safetensors; there is no hub access)")
    f = p / CONFIG
    if not f.is_file():
        raise ValueError(f"{f} is missing: a Hugging Face model directory needs config.json next to its safetensors")
    try:
        return config_from_hf(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None


def _weight_files(p: Path) -> list[Path]:
    if (p / INDEX).is_file():
        try:
            names = sorted(set(json.loads((p / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{p / INDEX} is corrupt ({e!r})") from None
        files = [p / n for n in names]
    else:
        files = [p / WEIGHTS]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f} is missing (weights of the checkpoint in {p})")
    return files


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, named as in Hugging Face."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    return out


def load_state(model: Llama, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy Hugging Face-named tensors into ``model``; ValueError on missing/unexpected/misshapen ones."""
    own = model.state_dict()
    wanted = {("" if k.startswith("lm_head.") else "model.") + k: k for k in own}
    if model.config.tie_embeddings:
        wanted.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # some tied files keep a copy
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(wanted) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(
            f"weights in {where} do not match its config.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for hf_name, name in wanted.items():
            src, dst = tensors[hf_name], own[name]
            if src.shape != dst.shape:
                raise ValueError(f"{hf_name} in {where} has shape {tuple(src.shape)}, config.json implies {tuple(dst.shape)}")
            dst.copy_(src)


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Llama:
    """A :class:`Llama` with the weights of a local Hugging Face Llama directory.

    On one process, ``model(input_ids)`` with input_ids (batch, seq) returns logits (batch, seq, vocab).
    Raises ValueError for missing or corrupt files and for weights that do not match config.json.
    """
    cfg = read_config(path)
    tensors = read_weights(path)
    model = Llama(cfg)
    load_state(model, tensors, str(path))
    return model.to(dtype).eval()


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        as_if_opened(tmp)  # mkstemp makes 0600; teammates sharing the run dir must read the model
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model: Llama, path: str | os.PathLike, *, dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout) into ``path``.

    Each file is written to a temporary name and renamed into place (weights first), so an
    interrupted save leaves the previous files intact. ``extra`` goes to ``ringrt.json``
    (e.g. the training length). Other files in the directory (a tokenizer.json) are kept.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        tensors[("" if name.startswith("lm_head.") else "model.") + name] = (t if dtype is None else t.to(dtype)).contiguous()
    dt = dtype or next(iter(tensors.values())).dtype
    _write_atomic(p / WEIGHTS, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    if (p / INDEX).exists():  # a sharded index from an earlier save would shadow the new file
        os.unlink(p / INDEX)
    _write_atomic(p / CONFIG, lambda f: Path(f).write_text(json.dumps(config_to_hf(cfg, dt), indent=2) + "\n"))
    if extra is not None:
        _write_atomic(p / "ringrt.json", lambda f: Path(f).write_text(json.dumps(extra, indent=2) + "\n"))
    return p
