"""The deterministic recipe of the embedded model zoo: tokenizer, data, architectures.

Everything is derived from the running interpreter's standard library with
fixed seeds, so the same Python version gives the same models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tokenlean.zoo.corpus import read_source, source_files

VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def work_dir() -> Path:
    """Checkpoints and token caches live outside the repository."""
    from tokenlean.zoo import tokenlean_home

    return tokenlean_home() / f"zoo-py{sys.version_info.major}{sys.version_info.minor}"


@dataclass
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    context: int = 2048
    # training
    steps: int = 1100
    batch: int = 4
    lr: float = 2e-3
    warmup: int = 50
    decay_fraction: float = 0.25  # warmup-stable-decay: linear decay over the last part
    retrieval_fraction: float = 0.15
    retrieval_pairs: int = 1  # definitions (and questions) per retrieval document
    retrieval_style: str = "repeat"  # how questions are asked (corpus.retrieval_pair)
    retrieval_layout: str = "block"  # questions at the end, or "scattered" through the code
    copy_fraction: float = 0.0  # rows where a code span recurs verbatim later (teaches copying)
    copy_repeats: int = 2  # occurrences of the span in a copy row
    copy_source: str = "code"  # "code": one code span; "random": many random-token spans;
    # "ngram": random spans over a 16-token alphabet per row (copying needs a multi-token match);
    # "values": spans of random retrieval-style values (look-alike digit and letter tokens)
    seed: int = 0
    dropout: float = 0.0  # residual dropout while training (attention and MLP outputs);
    # a stage may change it (the rate is set at every step)
    # (step, heads): the run had `heads` KV heads before `step`, then was regrouped to
    # num_key_value_heads (zoo.regroup), keeping what it had learned
    kv_heads_before: tuple[int, int] | None = None
    distill_from: str | None = None  # FastDraft: also train on this model's continuations
    distill_tokens: int = 600_000
    # Curriculum: (first step, changed fields) in step order, e.g. more retrieval documents
    # from some step on. Batches before a stage starts are unchanged by it.
    stages: tuple[tuple[int, dict], ...] = ()
    notes: list[str] = field(default_factory=list)

    def at(self, step: int) -> ModelSpec:
        """The settings in force at `step`: those of the last stage that has started."""
        spec = self
        for start, changes in self.stages:
            if step >= start:
                spec = replace(spec, **changes)
        return spec

    def hf_config(self) -> dict:
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": VOCAB_SIZE,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.context,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
        }


SPECS = {
    # Run 4: run 3's first 2400 steps unchanged (its stable checkpoint; run 3 began from
    # run 2's at 1650, run 2 from run 1's at 825), then scattered retrieval questions;
    # decay 3300-4400. Run 5: run 4's stable checkpoint (3300) extended, decay 3900-5200.
    # Run 6: run 5's stable checkpoint (3900) extended, decay 4050-5400.
    "tl-code": ModelSpec("tl-code", 384, 1024, 8, 6, 2, steps=5400, stages=(
        (825, {"retrieval_fraction": 0.3, "retrieval_pairs": 16}),
        (1025, {"retrieval_style": "repeat"}),  # 0 % retrieval at step 1000 with "assert"
        (1250, {"copy_fraction": 0.2}),  # still 0 % at 1175, even at distance 0: no copying yet
        (1475, {"copy_fraction": 0.35, "copy_repeats": 4}),  # at 1400 a repeated span was no
                                                             # better predicted than its first copy
        # run 3, from run 2's stable checkpoint: spans of random tokens recurring, which
        # nothing but copying predicts (run 2 went on to decay here, still without copying)
        (1650, {"copy_fraction": 0.35, "copy_source": "random", "copy_repeats": 3}),
        # copying emerging (a repeated random span's tokens: p 1e-4 -> ~0.25 by step 2300),
        # not yet enough for retrieval: more of those rows, fewer plain code windows
        (2350, {"copy_fraction": 0.45}),
        # run 4, from run 3's stable checkpoint (run 3 went on with "ngram" copy rows from
        # 2525: retrieval 40 / 38 / 20 %, and its questions came in a block at the row's end,
        # after the first of which the format gives the task away): questions scattered
        # through the code, as the evaluation asks its one; more retrieval rows
        (2400, {"retrieval_fraction": 0.45, "retrieval_layout": "scattered",
                "copy_fraction": 0.3, "copy_source": "ngram"}),
        # at 3175 the first answer token is right 39/40 times (teacher-forced), the whole
        # value 18/40: the misses copy a near neighbour ("60" -> "68"); twice the questions
        (3250, {"retrieval_pairs": 32}),
        # run 5, from run 4's stable checkpoint (run 4 decayed here: retrieval 75 / 76 / 70 %,
        # still rising at every probe): the same retrieval rows for longer; copying is
        # learned, so fewer copy rows and more code windows for next-token accuracy
        (3300, {"copy_fraction": 0.2}),
        # run 6, from run 5's stable checkpoint (run 5 decayed here: 79 / 78 / 73 %; its misses
        # found the definition and then guessed a look-alike of the value's middle token, a
        # token found nowhere in the prompt): copy rows of retrieval-style values instead
        (3900, {"copy_fraction": 0.25, "copy_source": "values"}),
    ), retrieval_style="assert", notes=[
        "Targets set by the project: held-out top-1 >= 55 %, retrieval >= 90 % at 2048. "
        "Neither is reached (see the table). Run 6 (this model) gives top-1 43.6 % "
        "(run 5: 44.0 %, run 4: 44.0 %, run 3: 42.7 %, run 2: 38.3 %) and retrieval at "
        "512 / 1024 / 2048 tokens of 90 / 89 / 83 % (run 5: 79 / 78 / 73 %, run 4: "
        "75 / 76 / 70 %, run 3: 40 / 38 / 20 %, run 2: 0 / 0 / 0 %). The two runs after it "
        "(3 KV heads, not shipped, below) reached 87 % (run 7) and 86 % (run 8) at 2048 "
        "and top-1 43.2 % and 41.7 %.",
        "Run 6: 5400 steps of 4 x 2048 tokens (44.2 M tokens, ~16 epochs of the 2.7 M-token "
        "training split), AdamW lr 2e-3 warmup-stable-decay (linear decay over steps "
        "4050-5400), bf16 autocast on 2 CPU cores. Steps 0-3900 are run 5's (its stable "
        "checkpoint; run 5 began from run 4's at 3300, run 4 from run 3's at 2400, run 3 "
        "from run 2's at 1650, run 2 from run 1's at 825). The mixture changed in stages "
        "(`stages` in the recipe): 30 % retrieval rows of 16 definitions and questions each "
        "(825), passkey-style questions that restate `NAME =` (1025), copy rows in which a "
        "code span recurs (1250, 1475), copy rows of random-token spans recurring 3 times "
        "between code (1650: 35 %; 2350: 45 %), then from 2400: 45 % retrieval rows whose "
        "questions are scattered through the code (each follows code at a random point of a "
        "full-length row, as the evaluation asks its one), 30 % copy rows of random spans "
        "over a 16-token alphabet per row (only a multi-token match finds the place to copy "
        "from), from 3250 32 questions per retrieval row, from 3300 20 % copy rows, and from "
        "3900 25 % copy rows of retrieval-style values (spans of 2-8 random 5-digit numbers "
        "and quoted 6-character strings, each recurring 3 times between code).",
        "Why the value copy rows (run 6): run 5's retrieval misses were not misses of place. "
        "In its last layer three query heads, all of one KV group, put ~95 % of their "
        "attention on the very token to copy, on misses as on hits (100 prompts at 512 "
        "tokens, attention read with transformers), and the model still emitted a "
        "look-alike of a value's middle token ('65' -> '14', found nowhere in the prompt). "
        "Rows that copy values drill exactly that. Teacher-forced retrieval at 2048 tokens "
        "(100 prompts): run 5's end 76, run 6 at step 4275 73, at 4650 74, at its end 85; "
        "the card's generated answers went 73 -> 83 % at 2048 and reached 90 % at 512. "
        "Copying of arbitrary random tokens, which the card's copy probe measures, faded "
        "without the random-span rows (0.180 -> 0.047).",
        "Top-1 and memorisation: the card's training-split figure shows what bounds top-1. "
        "Run 6 predicts 71.9 % of the tokens of 32 training windows (loss 1.25) against "
        "43.6 % held out (loss 3.22); run 5: 69.4 % against 43.8 % (24 windows each, ad "
        "hoc). The model has memorised much of its 2.7 M-token corpus, seen ~16 times, and "
        "more steps widen the gap instead of closing it. 55 % held out would need more "
        "distinct code than the standard library without its tests, or much stronger "
        "regularisation: residual dropout (`dropout` in the recipe, not used by any run "
        "yet; a stage can switch it on, so it can be tried from a stable checkpoint as well "
        "as from scratch) is the next thing to try.",
        "Run 7 (`tokenlean zoo train tl-code-next --steps 6000`, trained, not shipped): in "
        "run 6 the three copy heads share one 64-dim value (one KV group). Run 7 took "
        "run 6's stable checkpoint (4050), "
        "regrouped it from 2 to 3 KV heads (`zoo/regroup.py`, recipe field "
        "`kv_heads_before`: the query heads are reordered so that 5 of 6 keep the keys and "
        "values they were trained with, AdamW's moments move with them) and trained on with "
        "run 6's mixture to 6000 steps (decay 4500-6000). Its card: retrieval 90 / 90 / 87 % "
        "at 512 / 1024 / 2048, 85 % at 2048 on 300 other prompts (run 6: 79 %), but "
        "teacher-forced 82 of 100 at 2048 (run 6: 85), held-out top-1 43.2 % and loss 3.29 "
        "(run 6: 43.6 %, 3.22), training split 73.8 % (more memorised). It also repeats "
        "itself much less on the benchmark's code prompts, so lookup drafters find less "
        "(bench spec on code: prompt-lookup MAT 1.63, run 6: 3.41). A few points of "
        "retrieval, still short of 90 %, against a worse loss did not earn a new shipped "
        "model and every benchmark figure remeasured on it.",
        "Run 8 (recipe `tl-code-next`, trained, not shipped): run 7's stable checkpoint "
        "(4500) kept at the full learning rate to 5700, then decayed to 7600 (62.3 M "
        "tokens, ~23 epochs; 8.4 h over its lineage). It memorised more and generalised "
        "less: training split 79.7 % (run 7: 73.8 %), held-out top-1 41.7 % and loss 3.54 "
        "(run 7: 43.2 %, 3.29; run 6: 43.6 %, 3.22), copy probe 0.014. Retrieval rose at "
        "512 / 1024 tokens (95 / 95 %) but not at 2048 (86 %, run 7: 87 %; 85.7 % on 300 other "
        "prompts, run 7: 85.3 %). Longer training "
        "on this 2.7 M-token corpus is past its best: neither target moves with more steps.",
        "Why the scattered questions: run 3 asked its 16 questions as a block at the row's "
        "end, so after the first one the format gave the task away; it reached 40 / 38 / 20 %. "
        "With scattered questions, retrieval (an ad-hoc teacher-forced probe, 20 prompts "
        "at 512 / 2048 tokens; the card's figure, 100 generated answers per length, is the "
        "final model's) went 1 / 1 (step 2600) -> 11 / 8 (2925) -> 13 / 12 (3400, run 4 "
        "decaying) -> 15 / 16 (4000, run 4's last probe). Run 5 kept the learning rate up to 3900 "
        "instead: 11 / 8 (3450) -> 12 / 14 (3750) -> 12 / 12 (4050) -> 13 / 13 (4350) -> "
        "17 / 16 (4850, decaying). The first answer token is right 19-20 times out of 20 "
        "throughout; the misses copy a wrong middle token of the value (' 1', '64', '99' "
        "answered ' 1', '80', '99'). Run 5 took this for a failure to find the place (the "
        "whole `NAME = 1` must be matched, not ' 1' alone); run 6's reading of the "
        "attention showed the place was found (above). 900 more steps (run 5 over run 4) "
        "moved the card's retrieval by 3-4 points.",
        "Why the random spans (run 3): runs 1 and 2 never learned to copy. Their cards "
        "showed retrieval at 0 % even at distance 0. Code windows and code-span copies did "
        "not make the copying (induction) mechanism emerge within 18 M tokens. A random "
        "token can only be predicted by copying its earlier occurrence; with those rows the "
        "probability given to a repeated random span rose from chance (1e-4) at step 1650 "
        "to 0.32 at 2175. A 2-layer probe showed the same: spans repeated at a fixed period "
        "were learned in 150 steps (by position), with variable gaps not in 400; nothing in "
        "the training setup was wrong (run 2's card had suspected it).",
        "Held-out top-1 (training-log estimate on 8 windows) went 33.2 % (1600) -> 39.6 % "
        "(2200) -> 41.8 % (3400, before the decay) -> 46.3 % (4400, run 4's end); run 5: "
        "43.0 % (3900, before its decay) -> 46.6 % (5200); run 6: 44.1 % (4050) -> 46.5 % "
        "(5400). The card's figure over all held-out tokens went 44.0 % (run 4) -> 44.0 % "
        "(run 5) -> 43.6 % (run 6), its held-out loss 3.18 -> 3.19 -> 3.22. "
        "The corpus is small for the model (~16 epochs), which bounds it; more steps, more "
        "retrieval and copy rows and longer decays each moved it by a few points at most.",
    ]),
    "tl-code-draft": ModelSpec("tl-code-draft", 192, 512, 4, 3, 1, lr=3e-3, steps=600,
                               retrieval_fraction=0.05, distill_from="tl-code", notes=[
        "FastDraft-style (arXiv 2411.11055): about half of the training rows are windows of "
        "600 k tokens that tl-code generated itself (temperature 0.7) from corpus prompts, the "
        "rest corpus windows; 600 steps of 4 x 2048 tokens.",
        "Retrained from scratch for tl-code run 5 (16:10 on 2026-11-29; held-out top-1 "
        "26.0 %). The weights distilled from run 4 gave bench spec MAT 1.72 on code against "
        "run 5 (2.16 against run 4); those from run 2 gave 1.90 against run 4, 1.56 against "
        "run 3 and 1.95 against run 2. Against run 5 these retrained weights give MAT 1.74 "
        "on code (bench spec, 16:14): no real gain over the run-4 draft's 1.72. Against run 6 "
        "(not retrained for it) they give MAT 1.96 on code (bench spec, 18:18).",
    ]),
}

# tl-code run 7 (`tokenlean zoo train tl-code-next --steps 6000`), trained and not shipped
# (tl-code's card says why): run 6's stable checkpoint (4050) regrouped to 3 KV heads
# (zoo.regroup), so that the last layer's copy heads need not share one value; run 6's
# mixture; decay 4500-6000. Steps 0-4050 are tl-code run 6's. Run 8 (these 7600 steps,
# trained and not shipped): run 7's stable checkpoint (4500) kept at full learning rate to
# 5700, then decayed; it overfitted (held-out loss 3.54) and retrieval at 2048 stayed at 86 %.
SPECS["tl-code-next"] = replace(
    SPECS["tl-code"], name="tl-code-next", steps=7600, num_key_value_heads=3,
    kv_heads_before=(4050, 2), notes=["tl-code runs 7 and 8, not shipped: see tl-code's card."])


# --- tokenizer ---------------------------------------------------------------------

def train_tokenizer(out: Path) -> Path:
    """Byte-level BPE (vocab 8192) on the training split; deterministic for a corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = out / "tokenizer.json"
    if path.exists():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((read_source(p) for p in source_files("train")), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def tokenizer_files(folder: Path, tokenizer_json: Path, context: int) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a model folder."""
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS, "eos_token": EOS, "pad_token": "<|pad|>",
        "model_max_length": context, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "do_sample": False,
    }, indent=2) + "\n")


def token_stream(split: str, tokenizer_json: Path) -> np.ndarray:
    """All files of a split, tokenized and joined by EOS; cached on disk."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()[:12]
    cache = tokenizer_json.parent / f"tokens-{split}-{digest}.npy"
    if cache.exists():
        return np.load(cache)
    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.token_to_id(EOS)
    texts = [read_source(p) for p in source_files(split)]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(cache, arr)
    return arr
