import json
import os
import random
import tempfile
import types

import pytest

import torch

import alto_ext

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # GGUF bases converted for this session only (alto.gguf_bases): a run of the suite neither reads nor
    # fills the user's cache, and loads a file's copy from its second load on.
    if "ALTO_CACHE" not in os.environ:
        config._alto_cache = tempfile.TemporaryDirectory(prefix="alto-test-cache.")
        os.environ["ALTO_CACHE"] = config._alto_cache.name


def pytest_unconfigure(config):
    if hasattr(config, "_alto_cache"):
        del os.environ["ALTO_CACHE"]
        config._alto_cache.cleanup()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/device_run.sh on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ALTO_TEST_SYNC_CHECKS=0: CUDA tests run as users' runs do, without a wait after every op, so that
# their repeated steps are replayed as CUDA graphs (alto.step_graphs takes no step under sync checks).
SYNC_CHECKS = os.environ.get("ALTO_TEST_SYNC_CHECKS", "1") != "0"


@pytest.fixture(autouse=True)
def _sync_checks():
    # Index errors found on the GPU are raised by the op that hit them.
    alto_ext.set_sync_checks(SYNC_CHECKS)
    yield
    alto_ext.set_sync_checks(False)


@pytest.fixture(params=[True, False], ids=["split-k", "whole-k"])
def split_k(request):
    """CUDA shrinks of few tokens split their K (alto_ext's switch, on unless ALTO_SPLIT_K=0) or run
    it whole: the test runs both ways; the value is the setting."""
    was = alto_ext._C.set_split_k(request.param)
    yield request.param
    alto_ext._C.set_split_k(was)


_SEED = int.from_bytes(os.urandom(4), "little")


def pytest_report_header(config):
    return f"alto: fresh random inputs, torch seed {_SEED} (set ALTO_TEST_SEED to replay)"


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int(os.environ.get("ALTO_TEST_SEED", _SEED)))


# Shared by the test modules (`from conftest import ...`: pytest puts tests/ on the path).
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
WORDS = ["alpha", "beta", "gamma", "delta", "lora", "rank", "adapter", "token"]


def write_word_records(path, max_words: int, n: int = 40, seed: int = 3):
    """n JSONL records {"text": 2..max_words random words} at path (the same for a seed)."""
    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, max_words + 1)))})
                              for _ in range(n)))
    return path


# Families whose head width differs from hidden / heads in their own configs (set to 24 in tiny ones).
WIDE_HEADS = ("Qwen3", "Gemma", "Gemma2", "Gemma3")


def tiny_model(family: str, dtype=torch.float32, seed: int | None = 0, **extra):
    """A 2-layer random model of a transformers family (hidden 64, 4 heads, 2 KV heads, vocab 64)."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    config_class = getattr(transformers, f"{family}TextConfig", None) or getattr(transformers, f"{family}Config")
    widths = {"head_dim": 24} if family in WIDE_HEADS else {}
    config = config_class(**{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                             "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, **widths, **extra})
    return getattr(transformers, f"{family}ForCausalLM")(config).to(dtype)


def _rms_norm_in_float64(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_norms(model):
    """The model with its RMSNorms computing in its own dtype (returned as given). transformers'
    compute in float32 whatever the model's dtype: in a float64 model, sequences' gradients summed
    before a norm (a shared prefix, alto.shared_prefixes) or after it (each sequence's copy) differ
    at float32's rounding (1e-8); in float64 math both agree to 1e-16."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm_in_float64, m)
    return model


def hf_folder(folder, family="Llama"):
    """A tiny random model of a transformers family (Llama unless given) and a word-level tokenizer
    with a chat template, saved as a plain HF model folder."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                                chat_template="{% for m in messages %}{{ m['content'] }} </s> {% endfor %}")
    config = getattr(transformers, f"{family}Config")(vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, **TINY_LLAMA)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return {"hf_dir": str(folder)}


def gguf_folder(folder, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, seed=0):
    """A tiny random Llama as llama.cpp writes one: a GGUF file of Q8_0 weights (the embeddings tied
    to the head; drawn from `seed`) and a GPT-2 byte-level vocabulary with two merges and a chat
    template. The folder may exist (the file is written anew)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "Ġa", "lp"]
    folder.mkdir(exist_ok=True)
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: a control token
    w.add_token_merges(["Ġ a", "l p"])
    w.add_bos_token_id(0)  # transformers 5.17 reads it when it converts the vocabulary
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}")

    def weight(name, shape):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)

    weight("token_embd.weight", (len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = hidden // heads * kv_heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:
            weight(f"blk.{i}.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"hf_dir": str(folder), "gguf_file": "tiny.gguf"}


@pytest.fixture
def sweep_yaml(tmp_path):
    """write(out="run", **top_level_keys) -> the path of a small valid sweep file in tmp_path (a tiny
    random Llama on 40 JSONL records, 2x2 grid, CPU, output tmp_path/out); keys given replace the
    default ones whole."""
    def write(out: str = "run", **extra):
        data = write_word_records(tmp_path / "data.jsonl", max_words=5)
        doc = {"name": "t", "model": {"random_llama": TINY_LLAMA}, "device": "cpu", "checkpoint_every": 2,
               "output": str(tmp_path / out),
               "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
               "defaults": {"micro_batch_size": 2, "max_steps": 3, "target_modules": ["q_proj", "v_proj"]},
               "grid": {"rank": [2, 4], "lr": [1e-3, 3e-3]}, **extra}
        path = tmp_path / f"{out}.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path
    return write


class Interrupted(Exception):
    """Raised inside a run by interrupt(): a kill between two checkpoints."""


def _kill_at(micro_steps: int, progress: dict) -> None:
    if progress["micro_steps"] >= micro_steps:
        raise Interrupted


def interrupt(sweep_path, micro_steps: int, nproc: int = 1) -> None:
    """Runs a sweep file (alto tune's ranks) and breaks it off after `micro_steps` as a kill would:
    its last checkpoint is the last one it wrote on its own (--stop-after would write one where it
    stops), its logs hold the steps after it. With nproc ranks, rank 0 dies and the others end
    (alto.parallel.launch)."""
    import functools
    from pathlib import Path

    from alto.parallel import launch
    from alto.sweep import parse_sweep
    from alto.tune import run_rank

    text = Path(sweep_path).read_text()
    args = (text, str(sweep_path), parse_sweep(text).output, False, None, lambda *_: None, None,
            functools.partial(_kill_at, micro_steps))
    if nproc == 1:
        with pytest.raises(Interrupted):
            run_rank(*args)
    else:
        # rank 0 raises; the others, waiting on it in a collective, may fail first (gloo's connection closed)
        with pytest.raises(RuntimeError, match=r"rank \d+ exited with code"):
            launch(run_rank, nproc, (*args[:5], print, *args[6:]))


# float64 results of the same math in another order differ by ~1e-13 at most; every planted bug
# moves some loss or weight by > 1e-7 (see test_engine's test_the_peft_comparison_catches_planted_bugs).
EXACT_RTOL, EXACT_ATOL = 1e-10, 1e-12


def peft_alone(base_model, cfg, sequences, init, steps, pad_id):
    """An adapter of config cfg trained alone with HF PEFT (in the base model's dtype, our init
    copied in) on sequences (alto.data tokens: a context-only ~id gets label -100), served in order
    and cycling as alto's DataStream serves them; returns (losses, weights as alto lays them out)."""
    import copy

    import peft
    import torch.nn.functional as F

    from alto.step import pad_batch
    from alto.train import DataStream

    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, use_rslora=cfg.use_rslora,
                           target_modules=list(cfg.target_modules), bias="none")
    pm = peft.get_peft_model(copy.deepcopy(base_model), lora)
    inner = pm.base_model.model
    for path, tensors in init.items():
        layer = inner.get_submodule(path)
        assert layer.lora_A["default"].weight.dtype == base_model.dtype  # PEFT follows the base's dtype
        layer.lora_A["default"].weight.data.copy_(tensors["lora_A"])
        layer.lora_B["default"].weight.data.copy_(tensors["lora_B"].T)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream, losses, step = DataStream(sequences), [], 0
    for micro in range(steps):
        ids, mask, labels = pad_batch(stream.next_batch(cfg.micro_batch_size), pad_id)
        # The causal-LM loss written out: transformers' own casts the logits to float32.
        logits = pm(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        losses.append(loss.item())
        (loss / cfg.grad_accum).backward()
        if (micro + 1) % cfg.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            opt.step()
            opt.zero_grad()
            step += 1
            if step >= cfg.max_steps:
                break
    weights = {path: {"lora_A": inner.get_submodule(path).lora_A["default"].weight.detach(),
                      "lora_B": inner.get_submodule(path).lora_B["default"].weight.detach().T} for path in init}
    return losses, weights


def differences(name, ours, got, losses, weights) -> list[str]:
    """Where our losses and weights (got) differ from the reference's beyond float64 rounding."""
    if len(ours) != len(losses):
        return [f"{name}: {len(ours)} losses, reference {len(losses)}"]
    out = []
    if not torch.allclose(torch.tensor(ours, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64),
                          rtol=EXACT_RTOL, atol=EXACT_ATOL):
        out.append(f"{name} losses: ours {ours}, reference {losses}")
    if set(got) != set(weights):
        return out + [f"{name}: layers {sorted(got)} vs reference {sorted(weights)}"]
    for path in weights:
        for tensor, ref_w in weights[path].items():
            ours_w = got[path][tensor]
            assert ours_w.dtype == ref_w.dtype == torch.float64
            if not torch.allclose(ours_w, ref_w, rtol=EXACT_RTOL, atol=EXACT_ATOL):
                out.append(f"{name} {path} {tensor}: max |diff| {(ours_w - ref_w).abs().max().item():.3g}")
    return out
