"""The model-family seam (alto.families): each family's projection names and widths are those of the
Linear layers of a real transformers model of it, and size an adapter as PEFT does; a loaded model's
family decides what alto wraps and quantizes; a target module the model lacks is named.
(Training each family against PEFT: tests/test_engine.py::test_other_decoder_families_match_peft;
a Phi-3 adapter exported and loaded by PEFT: tests/test_export.py.)"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from alto.base import is_nf4, quantize_nf4  # noqa: E402
from alto.cli import main  # noqa: E402
from alto.families import FAMILIES, Llama, Phi3, check_targets, family_of  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.registry import AdapterConfig  # noqa: E402
from alto.sched.catalog import ModelShape  # noqa: E402
from alto.sched.memory import adapter_params  # noqa: E402
from conftest import hf_folder, tiny_model  # noqa: E402

# transformers families -> the alto family that covers them (Gemma's and Qwen3's tiny models have heads
# wider than hidden / heads: conftest.WIDE_HEADS)
MODELS = {"Llama": "llama", "Mistral": "llama", "Qwen2": "llama", "Qwen3": "llama", "Gemma": "llama", "Gemma2": "llama",
          "Gemma3": "llama", "Phi3": "phi3"}


@pytest.mark.parametrize("family", list(MODELS))
def test_a_familys_projections_are_the_linear_layers_of_its_models(family):
    name = MODELS[family]
    model = tiny_model(family)
    shape = ModelShape.from_hf_config(model.config)
    assert shape.family == name and family_of(model.config) is FAMILIES[name]
    for layer in model.model.layers:
        linears = {path.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
                   for path, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == shape.projection_dims()
    assert tuple(shape.projection_dims()) == FAMILIES[name].names


@pytest.mark.parametrize("family", list(MODELS))
def test_an_adapters_size_is_the_count_peft_trains(family):
    """The memory model's adapter_params (from the config alone) == PEFT's trainable parameters."""
    name = MODELS[family]
    model = tiny_model(family)
    targets = FAMILIES[name].names[::2]  # every other projection
    config = AdapterConfig(rank=3, target_modules=targets)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=3, target_modules=list(targets)))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapter_params(config, ModelShape.from_hf_config(model.config)) == trainable


def test_the_loaded_models_family_decides_what_is_wrapped_and_quantized():
    phi3 = tiny_model("Phi3")
    wrapped = MultiLoraModel(tiny_model("Phi3"))
    assert wrapped.family is FAMILIES["phi3"]
    assert {path.rsplit(".", 1)[-1] for path in wrapped.layers} == set(Phi3.names)
    quantize_nf4(phi3, torch.device("cpu"))
    for path, m in phi3.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert is_nf4(m.weight) == (path.rsplit(".", 1)[-1] in Phi3.names), path  # lm_head stays


def test_a_model_type_no_family_names_is_llama_like():
    class Config:
        model_type = "olmo2"
    assert family_of(Config()) is FAMILIES["llama"]
    assert ModelShape(64, 2, 96, 4, 2, 100).projection_dims()["q_proj"] == (64, 64)
    with pytest.raises(ValueError, match="model family 'gpt2' is unknown; known: llama, phi3"):
        ModelShape(64, 2, 96, 4, 2, 100, family="gpt2")


def test_a_target_module_the_model_lacks_is_named_before_anything_changes():
    model = MultiLoraModel(tiny_model("Phi3"))
    fine, lacking = AdapterConfig(target_modules=("qkv_proj",)), AdapterConfig(target_modules=("o_proj", "q_proj"))
    with pytest.raises(ValueError, match=r"target_modules: 'q_proj' \(adapter b\) is not a projection of this model "
                                         r"\(phi3: qkv_proj, o_proj, gate_up_proj, down_proj\)"):
        model.add_adapters({"a": fine, "b": lacking})
    assert model.configs == {}
    check_targets(FAMILIES["llama"], {"b": lacking})  # a Llama has both
    assert Llama.names == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_a_base_packed_steps_cannot_run_is_one_line_before_anything_is_written(tmp_path, sweep_yaml, capsys):
    """Gemma 2 soft-caps its attention logits: packing true is refused when the base loads (exit
    code 2, no run folder); padded steps train it."""
    model = hf_folder(tmp_path / "gemma2", "Gemma2")
    capsys.readouterr()
    assert main(["tune", str(sweep_yaml(model=model))]) == 2
    err = capsys.readouterr().err.strip()
    assert "packing: true" in err and "attn_logit_softcapping" in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()
    assert main(["tune", str(sweep_yaml(model=model, packing=False))]) == 0
    assert (tmp_path / "run" / "leaderboard.csv").is_file()
