"""The peers tokenlean is measured against. transformers is imported here only, lazily.

`TransformersPeer` loads the same checkpoint folder with AutoModelForCausalLM, in the
same dtype on the same device, and runs plain greedy `generate`. Its generation
config is replaced by a clean one (greedy, no EOS), so both sides generate exactly
the requested number of tokens and no checkpoint default (repetition penalty, ...)
changes the arithmetic.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tokenlean.errors import UserError

INSTALL_HINT = "pip install 'tokenlean[bench]'"


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f"the transformers peer needs transformers: {INSTALL_HINT} "
                        "(or run with --no-peers)") from None
    return transformers


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_causal_lm(folder: Path, device: torch.device, dtype: torch.dtype):
    """AutoModelForCausalLM from `folder` (or a .gguf file: transformers dequantizes it as we
    do), in `dtype` on `device`, with a clean generation config: greedy, no EOS (so no early
    stop), an explicit pad id (so no warning). The pad id is never used: one unpadded sequence."""
    transformers = import_transformers()
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"  # renamed in transformers 5
    hf_logging = transformers.utils.logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours is the only progress bar
    try:
        folder = Path(folder)
        where = {"gguf_file": folder.name} if folder.suffix.lower() == ".gguf" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder.parent if where else folder), **where, **{dtype_kw: dtype},
            low_cpu_mem_usage=True)
    except Exception as e:  # unsupported architecture, missing weights, ...
        raise UserError(f"transformers cannot load {folder}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model = model.to(device).eval().requires_grad_(False)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    model.generation_config = transformers.GenerationConfig(
        do_sample=False, num_beams=1, pad_token_id=0 if pad is None else pad,
        eos_token_id=None, bos_token_id=None)
    return model


class TransformersPeer:
    name = "transformers"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        transformers = import_transformers()
        self.model = load_causal_lm(folder, device, dtype)
        self.device = device
        self.version = transformers.__version__
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        # Target forward passes, counted by a hook: mean accepted tokens per step of the
        # speculative modes = new tokens / forwards of generate.
        self.forwards = 0
        self.model.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, module, args) -> None:
        self.forwards += 1

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 **generate_kwargs) -> tuple[list[int], float]:
        """Greedy continuation of exactly `max_new_tokens` tokens, and the wall time of generate.
        `generate_kwargs` go to `generate` (prompt_lookup_num_tokens, assistant_model, ...);
        `self.last_forwards` is then the number of target forward passes it made."""
        input_ids = torch.tensor([prompt_ids], device=self.device)
        attention_mask = torch.ones_like(input_ids)
        synchronize(self.device)
        forwards = self.forwards
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=attention_mask,
                                      max_new_tokens=max_new_tokens, **generate_kwargs)
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.last_forwards = self.forwards - forwards
        new = out[0, len(prompt_ids):].tolist()
        if len(new) != max_new_tokens:
            raise RuntimeError(f"transformers generated {len(new)} tokens, "
                               f"{max_new_tokens} were asked for")
        return new, elapsed
