"""Load Hugging Face checkpoint folders (config.json + *.safetensors) and GGUF files;
save folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenlean.errors import UserError
from tokenlean.model.config import ModelConfig
from tokenlean.model.gguf_read import GGUFFile, is_gguf
from tokenlean.model.packed import pack_for_cpu
from tokenlean.model.tokenizer import Tokenizer
from tokenlean.model.transformer import Transformer, rope_inv_freq

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # mps, meta, xla...: not supported
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # fp32 on CPU: exact and, for small models, as fast as bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_path(name_or_path: str | Path) -> Path:
    """A local HF folder, a .gguf file (or a folder holding exactly one and no config.json),
    or a hub id downloaded (or found in the local hub cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise UserError(f"{path} holds several .gguf files "
                            f"({', '.join(p.name for p in ggufs)}); give one of them")
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint folder "
                        "(nor a folder with one .gguf file)")
    if path.exists():
        if is_gguf(path):
            return path
        raise UserError(f"{path} is a file; give the checkpoint folder or a .gguf file")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"no such model folder: {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                            "*.jinja"]))
    except Exception as e:  # offline, unknown repo, ...: one line for the user
        raise UserError(f"cannot get {name!r} from the Hugging Face hub ({type(e).__name__}); "
                        "give a local checkpoint folder instead") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no *.safetensors weights")
    state = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except (OSError, SafetensorError) as e:  # truncated or not safetensors at all
            raise UserError(f"cannot read weights {folder / name}: {e}") from None
    return state


def load_model(name_or_path: str | Path, device: str | None = None, dtype=None,
               pack: bool = True) -> Transformer:
    """Load an HF folder, a .gguf file or a hub id; on CPU the projections are prepacked for
    oneDNN unless `pack` is False."""
    path = checkpoint_path(name_or_path)
    if is_gguf(path):
        return _load_gguf(GGUFFile(path), device, dtype, pack)
    config = ModelConfig.from_file(path / "config.json")
    dev = resolve_device(device)
    return _build(config, read_state_dict(path), dev, resolve_dtype(dtype, dev), pack, path)


def load_checkpoint(name_or_path: str | Path, device: str | None = None,
                    dtype=None) -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer; a GGUF file is parsed once for both."""
    path = checkpoint_path(name_or_path)
    if is_gguf(path):
        gguf = GGUFFile(path)
        model = _load_gguf(gguf, device, dtype)
        tokenizer = Tokenizer.from_parts(**gguf.tokenizer_parts())
    else:
        model, tokenizer = load_model(path, device, dtype), Tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, "
                        f"the model only {model.config.vocab_size}")
    return model, tokenizer


def _load_gguf(gguf: GGUFFile, device, dtype, pack: bool = True) -> Transformer:
    config = gguf.config()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    return _build(config, gguf.state_dict(config, dt), dev, dt, pack, gguf.path)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], dev: torch.device,
           dt: torch.dtype, pack: bool, where: Path) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:  # some checkpoints tie without saying so
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: report the first one on one line
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise UserError(f"{where}: weights do not match the config "
                        f"({lines[0] if lines else str(e).splitlines()[0]})") from None
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.inv_freq = rope_inv_freq(config)  # was on the meta device
    model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
    model.inv_freq = rope_inv_freq(config).to(dev)  # RoPE frequencies stay fp32
    if pack:
        pack_for_cpu(model)
    return model


def save_model(model: Transformer, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write config.json + model.safetensors that transformers loads as the same model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    os.replace(tmp, folder / "config.json")
