"""Parity: our model against transformers (the oracle) on random tiny configs of every family.

Each family is built with transformers, given random weights large enough that greedy
decoding does not collapse to one token, saved with `save_pretrained` and loaded back with
our `load_model`. Everything runs in fp32 on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenlean.errors import UserError  # noqa: E402
from tokenlean.model.config import SUPPORTED_FAMILIES, ModelConfig  # noqa: E402
from tokenlean.model.load import load_model  # noqa: E402

ATOL = 1e-4
VOCAB = 128
PROMPT_LEN = 24

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the short sequences here cross all three frequency bands.
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}

# name -> (config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    # A window shorter than the test sequences, so that it is really applied.
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "smollm": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "num_key_value_heads": 1},
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights well above the default init (std 0.02), and non-trivial norms and biases.

    transformers zero-inits biases (Qwen2's q/k/v) and one-inits norms (Qwen3's q/k norm);
    left that way, a bug in those paths would go unseen. The final norm gets random signs:
    with tied embeddings, a token's own embedding otherwise dominates its logits and greedy
    decoding repeats one token forever.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.norm.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def make_hf_model(family: str, seed: int = 0):
    config_cls, model_cls, overrides = FAMILIES[family]
    # Eager attention: the plainest reference path, unlike ours (SDPA).
    config = getattr(transformers, config_cls)(
        **{**TINY, **overrides}, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    randomize(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved folder)."""
    hf = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = load_model(folder, device="cpu", dtype="fp32")
    return hf, ours


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits  # (B, T, V)


def skip_if_windowed(model) -> None:
    """Explicit masks are taken as given: applying a sliding window is then the caller's job
    (the decode loop does, `decode.tree_mask`); the batch test below does not."""
    if model.config.sliding_window and model.config.sliding_window < 64:
        pytest.skip("hand-built masks here ignore the sliding window")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff < ATOL, f"{what}: max abs diff {diff:.2e} >= {ATOL}"


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n_new: int) -> list[int]:
    """Plain greedy decoding with our cache: prefill, argmax, feed back."""
    cache = model.new_cache(prompt.shape[1] + n_new)
    logits = model(prompt, cache=cache, last_n=1)
    out = []
    for _ in range(n_new):
        token = logits[0, -1].argmax()
        out.append(token.item())
        logits = model(token.view(1, 1), cache=cache)
    return out


# --- logits ---------------------------------------------------------------------------------


@torch.no_grad()
def test_prefill_and_decode_match_transformers(pair):
    hf, ours = pair
    n_decode = 20
    seq = random_tokens(PROMPT_LEN + n_decode, seed=1)
    ref = hf_logits(hf, seq)[0]  # (T, V)

    cache = ours.new_cache(seq.shape[1])
    got = [ours(seq[:, :PROMPT_LEN], cache=cache)[0]]
    for t in range(PROMPT_LEN, seq.shape[1]):
        got.append(ours(seq[:, t : t + 1], cache=cache)[0])
    assert cache.length == seq.shape[1]
    assert_close(torch.cat(got), ref, "prefill + decode")


@torch.no_grad()
def test_forward_without_cache_matches_transformers(pair):
    hf, ours = pair
    seq = random_tokens(PROMPT_LEN, seed=2)
    assert_close(ours(seq)[0], hf_logits(hf, seq)[0], "cache-free forward")


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    n_new = 64
    prompt = random_tokens(PROMPT_LEN, seed=3)
    ref = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
    )[0, PROMPT_LEN:].tolist()
    assert len(set(ref)) > 4, "weights too weak: greedy output is nearly constant"
    assert greedy(ours, prompt, n_new) == ref


# --- tree forward ---------------------------------------------------------------------------

PARENTS = [-1, 0, 0, 1, 1, 2, 5]  # node 0 follows the prefix's last token


def path_to(node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


def tree_mask_and_depths(prefix_len: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, prefix_len + N) mask: every cached slot, then ancestor-or-self among tree nodes;
    with a sliding window, only what lies less than `window` positions back."""
    n = len(PARENTS)
    mask = torch.zeros(n, prefix_len + n, dtype=torch.bool)
    mask[:, :prefix_len] = True
    depths = torch.zeros(n, dtype=torch.long)
    for node in range(n):
        ancestors = path_to(node)
        mask[node, prefix_len + torch.tensor(ancestors)] = True
        depths[node] = len(ancestors) - 1
    if window:
        keys = torch.cat([torch.arange(prefix_len), prefix_len + depths])
        mask &= keys[None, :] > (prefix_len + depths)[:, None] - window
    return mask, depths


@torch.no_grad()
def test_tree_forward_equals_per_path_forwards(pair):
    hf, ours = pair
    prefix = random_tokens(PROMPT_LEN, seed=4)
    tree = random_tokens(len(PARENTS), seed=5)
    mask, depths = tree_mask_and_depths(PROMPT_LEN, ours.config.sliding_window)

    cache = ours.new_cache(PROMPT_LEN + len(PARENTS))
    ours(prefix, cache=cache)
    tree_logits = ours(tree, positions=PROMPT_LEN + depths, cache=cache, mask=mask)[0]

    for node in range(len(PARENTS)):
        path = tree[:, path_to(node)]
        cache.truncate(PROMPT_LEN)
        path_logits = ours(path, cache=cache)[0, -1]
        assert_close(tree_logits[node], path_logits, f"tree node {node} vs its path")
        ref = hf_logits(hf, torch.cat([prefix, path], dim=1))[0, -1]
        assert_close(tree_logits[node], ref, f"tree node {node} vs transformers")


# --- batches --------------------------------------------------------------------------------


@torch.no_grad()
def test_batch_with_per_row_positions_equals_rows_alone(pair):
    """Row 1 is shorter and left-padded: its own positions (B, T) and a (B, T, S) mask."""
    _, ours = pair
    skip_if_windowed(ours)
    T, pad, n_decode = 16, 5, 3
    rows = [random_tokens(T, seed=6)[0], random_tokens(T - pad, seed=7)[0]]
    steps = random_tokens(2 * n_decode, seed=8).view(2, n_decode)

    # Batched: row 1 = [pad x5, tokens]; pads are invisible to real tokens and see only
    # themselves (a fully masked row would give NaN).
    tokens = torch.stack([rows[0], torch.cat([torch.zeros(pad, dtype=torch.long), rows[1]])])
    positions = torch.stack([torch.arange(T), (torch.arange(T) - pad).clamp(min=0)])
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, :pad] = False
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool)  # (B, T, S)
    cache = ours.new_cache(T + n_decode, batch=2)
    batched = [ours(tokens, positions=positions, cache=cache, mask=mask)[:, -1]]
    for i in range(n_decode):
        real = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step_pos = torch.stack([positions[0, -1] + 1 + i, positions[1, -1] + 1 + i]).view(2, 1)
        batched.append(
            ours(steps[:, i : i + 1], positions=step_pos, cache=cache, mask=real[:, None, :])[:, -1]
        )

    for b, row in enumerate(rows):
        cache = ours.new_cache(T + n_decode)
        alone = [ours(row[None], cache=cache)[0, -1]]
        for i in range(n_decode):
            alone.append(ours(steps[b : b + 1, i : i + 1], cache=cache)[0, -1])
        for i, (got, want) in enumerate(zip(batched, alone)):
            assert_close(got[b], want, f"row {b} step {i}")


# --- errors ---------------------------------------------------------------------------------


def test_unsupported_family_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UserError) as err:
        load_model(tmp_path, device="cpu")
    message = str(err.value)
    assert "gpt2" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        load_model(tmp_path / "does-not-exist", device="cpu")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_disabled_sliding_window_is_ignored(family):
    """Qwen configs on the hub often carry a sliding_window with use_sliding_window: false."""
    hf = {"model_type": family, "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "sliding_window": 4096, "use_sliding_window": False}
    assert ModelConfig.from_hf(hf).sliding_window is None


# --- CPU packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama-tied", "qwen2"])
@torch.no_grad()
def test_packed_projections_match_plain_ones(family, tmp_path):
    """On CPU the projections run through oneDNN prepacked weights; F.linear is the reference."""
    from tokenlean.model.packed import PackedLinear

    make_hf_model(family).save_pretrained(tmp_path)
    packed = load_model(tmp_path, device="cpu", dtype="fp32")
    plain = load_model(tmp_path, device="cpu", dtype="fp32", pack=False)
    if not any(isinstance(m, PackedLinear) for m in packed.modules()):
        pytest.skip("this torch build has no oneDNN linear ops")
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    seq = random_tokens(40, seed=7)
    assert_close(packed(seq)[0], plain(seq)[0], "packed vs plain projections")
    half = load_model(tmp_path, device="cpu", dtype="fp16")  # no packed fp16 kernels: plain path
    assert not any(isinstance(m, PackedLinear) for m in half.modules())


# --- sharded checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@torch.no_grad()
def test_sharded_checkpoint_loads_like_one_file(family, tmp_path):
    """Big hub checkpoints come as model-0000N-of-0000M.safetensors + an index: read them all."""
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    seq = random_tokens(PROMPT_LEN, seed=8)
    assert_close(load_model(tmp_path, device="cpu", dtype="fp32")(seq)[0], hf_logits(hf, seq)[0],
                 "sharded checkpoint")


# --- the decode step's shortcuts ----------------------------------------------------------------


def test_rope_by_roll_is_the_rotate_half_formula_bit_for_bit():
    """apply_rope rotates with roll and a sign-folded sin: the same numbers as the textbook
    x * cos + cat(-x2, x1) * sin, not merely close (exactness of speculative decoding leans
    on one formula everywhere)."""
    from tokenlean.model.transformer import apply_rope, signed_sin

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 64, generator=g)
    angles = torch.randn(7, 32, generator=g) * 40
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    textbook = x * cos + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * sin
    assert torch.equal(apply_rope(x, cos, signed_sin(sin)), textbook)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@torch.no_grad()
def test_bf16_on_cpu_attends_in_fp32(family, tmp_path):
    """bf16 weights on CPU keep an fp32 KV cache and attend in fp32 (torch's bf16 attention
    kernel is slow at one query); the result matches attention done by hand in fp32."""
    make_hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="bf16")
    assert model.kv_dtype == torch.float32 and model.new_cache(4).dtype == torch.float32
    assert load_model(tmp_path, device="cpu", dtype="fp32").kv_dtype == torch.float32
    seq = random_tokens(24, seed=5)
    cache = model.new_cache(seq.shape[1])
    logits = model(seq, cache=cache)
    assert logits.dtype == torch.bfloat16 and cache.layers[0].k.dtype == torch.float32
    # the same step with the attention forced to bf16 (cache in bf16) differs: the fp32
    # path is really taken
    from tokenlean.model.cache import KVCache

    bf16_cache = KVCache.for_model(model.config, seq.shape[1], dtype=torch.bfloat16)
    bf16_logits = model(seq, cache=bf16_cache)
    assert not torch.equal(bf16_logits, logits)
    assert (bf16_logits.float() - logits.float()).abs().max() < 0.5
