"""A small local model for running the real SGLang server without a model hub.

A byte-level BPE tokenizer trained on a seeded synthetic corpus and a 2-layer
Llama with seeded random weights. The same seed gives byte-identical files, so
tests and benchmarks on different machines serve the same model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The weights' layout, written into config.json. Small enough that a decode
# step is dominated by the engine's own per-step work, as on a GPU serving a
# large model the step is dominated by reading weights and KV.
LLAMA_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
_WORDS = (
    "the a of to and in is that for it as with was on be by this are or from at an "
    "which but not have has had were they their there what when where who will would "
    "can could should may might must shall do does did done make made take took given "
    "plan step tool call search answer question reason think branch path vote result "
    "first second third next then finally because therefore however thus so if else "
    "number value sum total count list item point idea outline expand summary check "
    "model request token prefix cache batch decode fork join stage parallel serial"
).split()
_FORMAT_VERSION = 2  # bump when the files this module writes change
# float32 weights. SGLang's dtype "auto" would serve them as float16, so `taper
# serve` passes --dtype float32 on the CPU engine, where batch-invariant matmuls
# (sglang_taper/cpu/batch_invariant.py) make every row's result independent of
# the batch: a held-out branch generates exactly what it would in any batch.
DTYPE = "float32"


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        sentence = " ".join(words).capitalize()
        out.append(sentence + rng.choice([".", "?", "!", ":", ","]))
    return out


def _build_tokenizer(out: Path, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _build_weights(out: Path, seed: int, vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    c = LLAMA_CONFIG
    h, inter, heads, kv_heads = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    head_dim = h // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(getattr(torch, DTYPE))

    tensors = {"model.embed_tokens.weight": rand(vocab, h, std=1.0)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, h, std=h**-0.5)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, h, std=h**-0.5)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, h, std=h**-0.5)
        tensors[p + "self_attn.o_proj.weight"] = rand(h, heads * head_dim, std=h**-0.5)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, h, std=h**-0.5)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, h, std=h**-0.5)
        tensors[p + "mlp.down_proj.weight"] = rand(h, inter, std=inter**-0.5)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=getattr(torch, DTYPE))
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=getattr(torch, DTYPE))
    tensors["model.norm.weight"] = torch.ones(h, dtype=getattr(torch, DTYPE))
    # A wide logit spread keeps the top-2 gap far above rounding noise, so that
    # greedy decoding does not flip between batch shapes.
    tensors["lm_head.weight"] = rand(vocab, h, std=1.0)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_config(out: Path, vocab: int) -> None:
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=vocab,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        hidden_act="silu",
        torch_dtype=DTYPE,
        attention_bias=False,
        mlp_bias=False,
        **LLAMA_CONFIG,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """Build the model into `out` unless a complete build with this seed is there.

    Returns `out`. A stamp file written last marks a complete build, so an
    interrupted build is redone rather than served half-written.
    """
    stamp = out / "taper_model.json"
    want = {"format": _FORMAT_VERSION, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(out, seed)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    _build_weights(out, seed, vocab)
    _write_config(out, vocab)
    stamp.write_text(json.dumps(want) + "\n")
    return out
