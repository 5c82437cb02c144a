"""The objective seam (alto.objectives): training steps, held-out passes and admission's probes all
take each adapter's loss from its objective, and the sequences of one sample (a preference pair,
say) stay together: in an adapter's data stream, in a step, in a held-out pass. Checked with an
objective of pairs defined here (the SFT loss over samples of two sequences) and with one that
scales SFT's loss (a step's reported losses and gradients follow it). SFT itself is checked against
PEFT in tests/test_engine.py."""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import alto.evaluation  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.objectives import OBJECTIVES, SFT  # noqa: E402
from alto.registry import AdapterConfig, Registry  # noqa: E402
from alto.train import DataStream, Trainer  # noqa: E402

VOCAB, PAD = 64, 0


class Pairs(SFT):
    """SFT's loss over samples of two sequences (a stand-in for a pair objective)."""

    name, per_sample = "pairs", 2


class Doubled(SFT):
    """Twice SFT's loss: a step's reported loss and gradient must follow the objective."""

    name = "doubled"

    def loss_sums(self, token_loss, labels, plan, reference=None):
        sums = super().loss_sums(token_loss, labels, plan, reference)
        return torch.stack([2 * sums[0], sums[1]])


def pair_sequences(pairs: int, seed: int) -> list[list[int]]:
    """2 * pairs sequences; the two of pair i both start with token 1 + i (which pair they are)."""
    rng = random.Random(seed)
    return [[1 + i] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 12))] for i in range(pairs) for _ in range(2)]


def assert_whole_pairs(sequences) -> None:
    firsts = [int(s[0]) for s in sequences]
    assert len(firsts) % 2 == 0 and firsts[::2] == firsts[1::2], firsts


def tiny_model() -> MultiLoraModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    return MultiLoraModel(transformers.LlamaForCausalLM(config).double().eval())


def test_a_data_stream_serves_whole_samples_in_its_own_order_across_epochs():
    stream = DataStream.shuffled(pair_sequences(5, seed=1), seed=3, per_sample=2)
    served = [s for _ in range(7) for s in stream.next_batch(3)]  # 21 pairs: four epochs and a bit
    assert_whole_pairs(served)
    order = [int(s[0]) for s in served[::2]]
    assert sorted(order[:5]) == [1, 2, 3, 4, 5] and order[:5] != [1, 2, 3, 4, 5]  # shuffled, each pair once
    assert order[5:10] == order[:5] and stream.position == 21
    with pytest.raises(ValueError, match="whole samples of 2 sequences, not 3"):
        DataStream(pair_sequences(2, seed=1)[:3], per_sample=2)


def test_one_sequence_samples_are_served_as_before():
    """per_sample 1 gives the order a plain shuffle gives (what checkpoints of earlier runs hold)."""
    sequences = pair_sequences(6, seed=2)
    order = list(sequences)
    random.Random(4).shuffle(order)
    stream = DataStream.shuffled(sequences, seed=4)
    assert [s.tolist() for s in stream.next_batch(len(order))] == order


@pytest.mark.parametrize("packed", [True, False])
def test_held_out_passes_never_split_a_sample(packed, monkeypatch):
    model = tiny_model()
    model.add_adapters({"a": AdapterConfig(rank=2, seed=1), "b": AdapterConfig(rank=3, seed=2)})
    batches = {"a": pair_sequences(6, seed=5), "b": pair_sequences(4, seed=6)}
    chunks, original = [], alto.evaluation.colocated_losses

    def recorded(m, chunk, *args, **kw):
        chunks.append(chunk)
        return original(m, chunk, *args, **kw)
    monkeypatch.setattr(alto.evaluation, "colocated_losses", recorded)
    [pairs] = alto.evaluation.held_out_means(model, batches, PAD, torch.device("cpu"), 20, packed=packed, objective=Pairs())
    assert len(chunks) > 3  # small passes: a split was possible
    for chunk in chunks:
        for sequences in chunk.values():
            assert_whole_pairs(sequences)
    chunks.clear()
    [whole] = alto.evaluation.held_out_means(model, batches, PAD, torch.device("cpu"), 10**6, packed=packed)
    assert torch.allclose(torch.tensor(pairs), torch.tensor(whole), rtol=1e-12, atol=0)  # the same mean


def test_a_training_step_takes_whole_samples_and_the_objectives_loss_and_gradient():
    sequences = pair_sequences(8, seed=7)
    runs = {}
    for objective in (SFT(), Doubled(), Pairs()):
        model, registry = tiny_model(), Registry()
        stream = DataStream.shuffled(sequences, seed=1, per_sample=objective.per_sample)
        served, serve = [], stream.next_batch
        stream.next_batch = lambda n: served.append(serve(n)) or served[-1]
        trainer = Trainer(model, registry, {"a": stream}, PAD, objective=objective)
        # grad_accum 2: the first micro-step's gradients wait in the model, unstepped
        trainer.admit([registry.add("a", AdapterConfig(rank=2, micro_batch_size=3, grad_accum=2, seed=1))])
        for layer in model.layers.values():  # B = 0 at init would leave A's gradient 0
            if "a" not in layer.rows:  # a layer the adapter does not target
                continue
            B = layer.tensors("a")[0][1]
            B.copy_(0.1 * torch.randn(B.shape, generator=torch.Generator().manual_seed(5)))
        loss = trainer.step()["a"]
        runs[objective.name] = loss, served, [g.clone() for g in model.adapter_tensors("a")[1]]
    (sft_loss, sft_served, sft_grads), (doubled_loss, _, doubled_grads) = runs["sft"], runs["doubled"]
    assert doubled_loss == pytest.approx(2 * sft_loss, rel=1e-12)
    assert all(torch.allclose(d, 2 * g, rtol=1e-12, atol=1e-15) for d, g in zip(doubled_grads, sft_grads))
    assert any(g.abs().sum() > 0 for g in sft_grads)
    pairs_served = runs["pairs"][1]
    assert [len(b) for b in sft_served] == [3] and [len(b) for b in pairs_served] == [6]
    assert_whole_pairs(pairs_served[0])
    assert "sft" in OBJECTIVES and OBJECTIVES["sft"].per_sample == 1
