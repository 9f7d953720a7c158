"""Shared fixtures: a tiny random Llama checkpoint folder in Hugging Face format.

The folder is built once per session in a temp dir: a byte-level BPE tokenizer
trained here on a few lines of Python and non-ASCII text (so every byte is
encodable and multi-byte characters really split across tokens), and random
Llama weights from transformers' `LlamaForCausalLM` with a fixed seed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import settings

# the same examples on every run, so CI cannot turn red on a draw that no one can replay
settings.register_profile("tokenlean", derandomize=True)
settings.load_profile("tokenlean")

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_CONTEXT = 128


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory):
    """What drafters learn and keep between processes (Token Recycling's matrices) goes to
    a temporary directory, never to the user's ~/.cache/tokenlean/state."""
    import os

    old = os.environ.get("TOKENLEAN_STATE")
    os.environ["TOKENLEAN_STATE"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("TOKENLEAN_STATE", None)
    else:
        os.environ["TOKENLEAN_STATE"] = old

TRAIN_TEXT = [
    "def f(x):\n    return x + 1\n",
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "while True:\n    break\n",
    "# café, naïve, résumé, élève\n",
    "日本語のテキスト。東京は日本の首都です。\n",
    "emoji: 🙂 🚀 🎉 👍\n",
]


def _train_tokenizer(folder) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 20, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
    }))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder `tokenlean.lm.load` accepts: tokenizer files + random tiny Llama weights."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = _train_tokenizer(folder)
    eos_id = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        # Larger than the default 0.02, so greedy output does not collapse to one token.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from tokenlean.lm import load

    return load(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_draft_dir(tiny_model_dir, tmp_path_factory):
    """A second random tiny Llama with the target's tokenizer: a draft model that is often wrong."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-draft")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 1
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and the suite must not fight other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
