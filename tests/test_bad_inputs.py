"""Every bad input is one error line naming the file, field or value, exit code 2, no traceback and
nothing written: `alto tune`, `alto simulate` and `alto check` driven with the mistakes users make
(sweep values of every field type, files that are missing, empty, binary, of the wrong shape or a
folder, devices, flags), and the op library's wrappers (ValueError naming the argument)."""
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

import alto_ext  # noqa: E402
from alto.cli import main  # noqa: E402
from alto.parallel import free_port  # noqa: E402
from alto_ext import Segments  # noqa: E402
from conftest import TINY_LLAMA  # noqa: E402

NO_GPU = not torch.cuda.is_available()
BINARY = bytes(range(128, 256)) * 4  # not UTF-8 from its first byte, no newline


def assert_one_line_exit_2(argv, capture, words):
    code = main([str(a) for a in argv])
    captured = capture.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert err.count("\n") == 0 and err.startswith("alto") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# ---- alto tune: sweep values -------------------------------------------------------------------------


SWEEP_VALUES = {  # id: (top-level keys replaced, words the error line must hold)
    "rank 0": ({"grid": {"rank": [0, 4]}}, ["grid[rank0].rank: 0 is invalid"]),
    "rank a float": ({"grid": {"rank": [1.5]}}, ["grid[rank1p5].rank: 1.5"]),
    "lr negative": ({"grid": {"lr": [-0.1]}}, ["grid[lr-0p1].lr: -0.1"]),
    "lr a word": ({"grid": {"lr": ["fast"]}}, ["grid[lrfast].lr: 'fast'", "a number"]),
    "alpha a bool": ({"defaults": {"alpha": True}}, ["defaults.alpha: True", "a number"]),
    "dropout 1": ({"defaults": {"dropout": 1.0}}, ["defaults.dropout: 1.0"]),
    "micro_batch_size 0": ({"defaults": {"micro_batch_size": 0}}, ["defaults.micro_batch_size: 0"]),
    "max_steps a word": ({"defaults": {"max_steps": "ten"}}, ["defaults.max_steps: 'ten'"]),
    "max_grad_norm negative": ({"defaults": {"max_grad_norm": -1}}, ["defaults.max_grad_norm: -1"]),
    "schedule unknown": ({"defaults": {"schedule": "exp"}}, ["defaults.schedule: 'exp'", "cosine"]),
    "use_rslora a word": ({"defaults": {"use_rslora": "yes"}}, ["defaults.use_rslora: 'yes'", "true or false"]),
    "seed negative": ({"defaults": {"seed": -3}}, ["defaults.seed: -3"]),
    "target_modules not a name": ({"defaults": {"target_modules": ["q proj"]}},
                                  ["defaults.target_modules: 'q proj'", "a module name"]),
    # checked against the loaded model (alto.families), still before anything is written
    "target_modules not in the model": ({"defaults": {"target_modules": ["qkv_proj"]}},
                                        ["target_modules: 'qkv_proj'", "not a projection of this model", "llama: q_proj"]),
    "target_modules a number": ({"defaults": {"target_modules": 5}}, ["defaults.target_modules: 5"]),
    "defaults unknown field": ({"defaults": {"rnak": 4}}, ["defaults.rnak: unknown field"]),
    "grid unknown field": ({"grid": {"rnak": [4]}}, ["grid.rnak: unknown field"]),
    "adapter unknown field": ({"adapters": [{"id": "w", "rnak": 4}]}, ["adapters[w].rnak: unknown field"]),
    "adapter bad value": ({"adapters": [{"id": "w", "rank": 0}]}, ["adapters[w].rank: 0 is invalid"]),
    "defaults a list": ({"defaults": [1, 2]}, ["defaults", "mapping"]),
    "grid value not a list": ({"grid": {"rank": 4}}, ["grid", "non-empty lists"]),
    "grid empty list": ({"grid": {"rank": []}}, ["grid", "non-empty lists"]),
    "adapters not a list": ({"adapters": {"id": "x"}}, ["adapters", "list"]),
    "adapter id with a slash": ({"adapters": [{"id": "a/b"}]}, ["adapters[0].id", "'a/b'"]),
    "adapter id twice": ({"grid": {}, "adapters": [{"id": "x"}, {"id": "x"}]}, ["duplicate id 'x'"]),
    "no adapters": ({"grid": {}}, ["no adapters"]),
    "unknown top key": ({"colour": "red"}, ["unknown key 'colour'"]),
    "grid points with one id": ({"grid": {"lr": [0.001, 1.0e-3]}}, ["grid[lr0p001]", "values repeat"]),
    "name null": ({"name": None}, ["name", "None"]),
    "random_llama seed too large": ({"model": {"random_llama": {**TINY_LLAMA, "seed": 2**64}}},
                                    ["model.random_llama.seed"]),
    "name with a slash": ({"name": "a/b"}, ["name", "'a/b'"]),
    "data not a mapping": ({"data": "chatterbot"}, ["data", "mapping"]),
    "data unknown key": ({"data": {"source": "chatterbot", "file": "x"}}, ["data", "mapping with keys"]),
    "data source unknown": ({"data": {"source": "csv", "path": "x.csv"}}, ["data.source: 'csv'"]),
    "data path missing": ({"data": {"source": "jsonl", "path": "/nonexistent.jsonl"}},
                          ["data.path", "/nonexistent.jsonl"]),
    "hf source without path": ({"data": {"source": "hf"}}, ["data.path", "needs a path"]),
    "max_length 1": ({"data": {"source": "chatterbot", "max_length": 1}}, ["data.max_length: 1"]),
    "eval_fraction 1.5": ({"data": {"source": "chatterbot", "eval_fraction": 1.5}}, ["data.eval_fraction: 1.5"]),
    "limit 0": ({"data": {"source": "chatterbot", "limit": 0}}, ["data.limit: 0"]),
    "train_on unknown": ({"data": {"source": "chatterbot", "train_on": "prompt"}}, ["data.train_on: 'prompt'"]),
    "topics unknown": ({"data": {"source": "chatterbot", "topics": ["nope"]}}, ["data.topics", "'nope'", "trivia"]),
    "topics without chatterbot": ({"data": {"source": "hf", "path": "x", "topics": ["ai"]}}, ["data.topics"]),
    "eval_split of chatterbot": ({"data": {"source": "chatterbot", "eval_split": "test"}}, ["data.eval_split"]),
    "eval_split of a jsonl file": ({"data": {"source": "jsonl", "path": "data.jsonl", "eval_split": "test"}},
                                   ["data.eval_split", "source hf"]),
    "eval_path missing": ({"data": {"source": "jsonl", "path": "data.jsonl", "eval_path": "none.jsonl"}},
                          ["data.eval_path", "none.jsonl"]),
    "eval every 0": ({"eval": {"every": 0}}, ["eval.every: 0"]),
    "eval unknown key": ({"eval": {"steps": 3}}, ["eval", "mapping with keys"]),
    "eval samples a word": ({"eval": {"samples": "all"}}, ["eval.samples: 'all'"]),
    "eval max_new_tokens 0": ({"eval": {"max_new_tokens": 0}}, ["eval.max_new_tokens: 0"]),
    "eval metric unknown": ({"eval": {"metric": "bleu"}}, ["eval.metric", "'bleu'", "exact_match"]),
    "eval metric not importable": ({"eval": {"metric": "no_such_module:score"}}, ["eval.metric", "cannot import"]),
    "eval every against the monitor's": ({"monitor": {"signal": "eval", "eval_every": 2}, "eval": {"every": 3}},
                                          ["eval.every: 3", "monitor.eval_every=2"]),
    "export unknown": ({"export": "first"}, ["export: 'first'", "best, last"]),
    "export best without held-out data": ({"data": {"source": "chatterbot", "eval_fraction": 0}, "export": "best"},
                                          ["export", "needs held-out data"]),
    "metric on every token": ({"data": {"source": "chatterbot", "train_on": "all"}, "eval": {"metric": "exact_match"}},
                              ["eval.metric", "train_on: completion"]),
    "tasks not a list": ({"tasks": {"name": "a"}}, ["tasks", "non-empty list"]),
    "task without a name": ({"tasks": [{"grid": {"rank": [2]}}]}, ["tasks[0].name", "None"]),
    "task name with a slash": ({"tasks": [{"name": "a/b"}]}, ["tasks[0].name", "'a/b'"]),
    "task twice": ({"tasks": [{"name": "a"}, {"name": "a"}]}, ["tasks[1].name", "duplicate task 'a'"]),
    "task unknown key": ({"tasks": [{"name": "a", "model": "x"}]}, ["tasks[0]", "unknown key 'model'"]),
    "task data bad": ({"tasks": [{"name": "a", "data": {"max_length": 1}}]}, ["tasks[a].data.max_length: 1"]),
    "task data a list": ({"tasks": [{"name": "a", "data": ["x"]}]}, ["tasks[a].data", "mapping"]),
    "task grid bad": ({"tasks": [{"name": "a", "grid": {"rank": [0]}}]}, ["tasks[a].grid[rank0].rank: 0 is invalid"]),
    "shared defaults unknown field": ({"tasks": [{"name": "a"}], "defaults": {"rnak": 4}}, ["error: defaults.rnak:"]),
    "task defaults unknown field": ({"tasks": [{"name": "a", "defaults": {"rnak": 4}}]}, ["tasks[a].defaults.rnak:"]),
    "task monitor bad": ({"tasks": [{"name": "a", "monitor": {"rule": "x"}}]}, ["tasks[a].monitor.rule='x'"]),
    "task topics unknown": ({"tasks": [{"name": "a", "data": {"source": "chatterbot", "topics": ["nope"]}}]},
                            ["tasks[a].data.topics", "'nope'"]),
    "device tpu": ({"device": "tpu"}, ["device", "'tpu'"]),
    "checkpoint_every 0": ({"checkpoint_every": 0}, ["checkpoint_every: 0"]),
    "max_running 0": ({"max_running": 0}, ["max_running: 0"]),
    "reclaim unknown": ({"reclaim": "hoard"}, ["reclaim: 'hoard'"]),
    "model unknown": ({"model": "gpt5"}, ["model", "'gpt5'", "smollm2"]),
    "model two sources": ({"model": {"hf_dir": "x", "random_llama": {}}}, ["model", "must be smollm2"]),
    "gguf_file without hf_dir": ({"model": {"random_llama": {}, "gguf_file": "m.gguf"}}, ["model.gguf_file"]),
    "base dtype unknown": ({"base": {"dtype": "float8"}}, ["base.dtype: 'float8'"]),
    "base not a mapping": ({"base": "bf16"}, ["base: 'bf16'", "dtype"]),
    "base float64 on cuda": ({"base": {"dtype": "float64"}, "device": "cuda"}, ["base.dtype", "device: cpu"]),
    "base quantize unknown": ({"base": {"quantize": "int3"}}, ["base.quantize: 'int3'", "nf4"]),
    "nf4 on a width no block divides": ({"base": {"quantize": "nf4"}, "model": {"random_llama": {
        **TINY_LLAMA, "hidden_size": 20, "num_attention_heads": 2, "num_key_value_heads": 2}}},
        ["base.quantize: nf4", "multiple of 64", "q_proj is (20, 20)"]),
    "random_llama odd head_dim": ({"model": {"random_llama": {**TINY_LLAMA, "hidden_size": 20, "num_attention_heads": 4,
                                                              "num_key_value_heads": 2}}}, ["model.random_llama", "rope"]),
    "nf4 sharded over one rank": ({"base": {"quantize": "nf4"}, "shard_base": True},
                                  ["shard_base: true with base.quantize: nf4 needs 2 or more ranks"]),
    "shard_base word": ({"shard_base": "yes"}, ["shard_base: 'yes'", "true, false or auto"]),
    "dtype under model": ({"model": {"random_llama": TINY_LLAMA, "dtype": "float64"}}, ["model", "must be"]),
    "max_running word": ({"max_running": "many"}, ["max_running: 'many'", "auto"]),
    "max_tokens_per_step 1": ({"max_tokens_per_step": 1}, ["max_tokens_per_step: 1"]),
    "memory_budget_gb 0": ({"memory_budget_gb": 0}, ["memory_budget_gb: 0"]),
    "memory budget with a fixed max_running": ({"max_running": 4, "memory_budget_gb": 10},
                                               ["memory_budget_gb", "max_running: auto"]),
    "packing yes-string": ({"packing": "yes"}, ["packing: 'yes'", "true or false"]),
    "random_llama vocab below the tokenizer's": ({"model": {"random_llama": {**TINY_LLAMA, "vocab_size": 100}}},
                                                 ["model.random_llama.vocab_size: 100"]),
    "random_llama not a mapping": ({"model": {"random_llama": 5}}, ["model.random_llama", "5"]),
    "random_llama negative size": ({"model": {"random_llama": {**TINY_LLAMA, "hidden_size": -8}}},
                                   ["model.random_llama.hidden_size: -8"]),
    "random_llama heads not dividing": ({"model": {"random_llama": {**TINY_LLAMA, "num_attention_heads": 5}}},
                                        ["model.random_llama.num_attention_heads", "divide hidden_size"]),
    "random_llama kv heads not dividing": ({"model": {"random_llama": {**TINY_LLAMA, "num_key_value_heads": 3}}},
                                           ["model.random_llama.num_key_value_heads"]),
    "random_llama unknown activation": ({"model": {"random_llama": {**TINY_LLAMA, "hidden_act": "wiggle"}}},
                                        ["model.random_llama"]),
    "model folder missing": ({"model": {"hf_dir": "/no/such/model"}}, ["model.hf_dir", "/no/such/model"]),
    "monitor not a mapping": ({"monitor": "asha"}, ["monitor", "mapping"]),
    "monitor alto on training losses": ({"monitor": {"rule": "alto", "signal": "train"}}, ["monitor.signal='train'"]),
    "monitor alto window": ({"monitor": {"rule": "alto", "window": 1}}, ["monitor.window=1"]),
    "monitor alto patience": ({"monitor": {"rule": "alto", "patience": 0}}, ["monitor.patience=0"]),
    "monitor alto tau_slope": ({"monitor": {"rule": "alto", "tau_slope": "steep"}}, ["monitor.tau_slope='steep'"]),
    "monitor alto tau_gap": ({"monitor": {"rule": "alto", "tau_gap": None}}, ["monitor.tau_gap=None"]),
    "monitor alto warmup": ({"monitor": {"rule": "alto", "warmup": 1.5}}, ["monitor.warmup=1.5"]),
    "monitor alto keep": ({"monitor": {"rule": "alto", "keep": 0}}, ["monitor.keep=0"]),
    "monitor rules repeated": ({"monitor": {"rule": "asha+asha"}}, ["monitor.rule='asha+asha'"]),
    "monitor alto without evaluations": ({"monitor": {"rule": "alto"}, "eval": {"every": None}}, ["eval.every", "None"]),
    "monitor unknown key": ({"monitor": {"rule": "asha", "stop_after": 3}}, ["monitor", "keys"]),
    "monitor rule unknown": ({"monitor": {"rule": "best"}}, ["monitor.rule='best'"]),
    "monitor rule a list with an unknown rule": ({"monitor": {"rule": ["asha", "x"]}}, ["monitor.rule='asha+x'"]),
    "monitor eta a word": ({"monitor": {"eta": "fast"}}, ["monitor.eta='fast'", "a number"]),
    "monitor grace 0": ({"monitor": {"grace": 0}}, ["monitor.grace=0"]),
    "monitor extrapolate a word": ({"monitor": {"extrapolate": "no"}}, ["monitor.extrapolate='no'"]),
    "search not a mapping": ({"grid": None, "search": "tpe"}, ["search", "mapping"]),
    "search beside a grid": ({"search": {"space": {"rank": [2, 4]}}}, ["grid", "and search"]),
    "search sampler unknown": ({"grid": None, "search": {"sampler": "bayes", "space": {"rank": [2]}}},
                               ["search.sampler: 'bayes'", "tpe"]),
    "search space empty": ({"grid": None, "search": {"space": {}}}, ["search.space", "must map"]),
    "search space field unknown": ({"grid": None, "search": {"space": {"rnak": [2]}}},
                                   ["search.space.rnak", "searchable"]),
    "search space of seeds": ({"grid": None, "search": {"space": {"seed": [1, 2]}}}, ["search.space.seed"]),
    "search range upside down": ({"grid": None, "search": {"space": {"lr": {"low": 0.01, "high": 0.001}}}},
                                 ["search.space.lr", "below high"]),
    "search log range from 0": ({"grid": None, "search": {"space": {"lr": {"low": 0, "high": 0.01, "log": True}}}},
                                ["search.space.lr.low", "log scale"]),
    "search rank range of floats": ({"grid": None, "search": {"space": {"rank": {"low": 2.5, "high": 8}}}},
                                    ["search.space.rank.low: 2.5", "an int"]),
    "search rank from 0": ({"grid": None, "search": {"space": {"rank": {"low": 0, "high": 8}}}},
                           ["search.space.rank", "0", "1..4096"]),
    "search schedule range": ({"grid": None, "search": {"space": {"schedule": {"low": 1, "high": 2}}}},
                              ["search.space.schedule", "choices"]),
    "search choice repeated": ({"grid": None, "search": {"space": {"rank": [2, 2]}}}, ["search.space.rank", "repeats"]),
    "search grid sampler over a range": ({"grid": None, "search": {"sampler": "grid", "space": {
        "lr": {"low": 0.001, "high": 0.01}}}}, ["search.space.lr", "grid takes lists"]),
    "search pruner unknown": ({"grid": None, "search": {"pruner": "asha", "space": {"rank": [2]}}},
                              ["search.pruner: 'asha'", "median"]),
    "search pruner without evaluations": ({"grid": None, "eval": {"every": None}, "search": {
        "pruner": "median", "space": {"rank": [2]}}}, ["search.pruner", "eval.every"]),
    "search defaults field unknown": ({"grid": None, "defaults": {"rnak": 8}, "search": {"space": {"rank": [2]}}},
                                      ["defaults.rnak", "unknown field"]),
    "search defaults value bad": ({"grid": None, "defaults": {"dropout": 2}, "search": {"space": {"rank": [2]}}},
                                  ["defaults.dropout: 2"]),
    "search grid of fewer points than trials": ({"grid": None, "search": {"sampler": "grid", "trials": 3, "space": {
        "rank": [2, 4]}}}, ["search.trials", "2 points"]),
    "search trials 0": ({"grid": None, "search": {"trials": 0, "space": {"rank": [2]}}}, ["search.trials: 0"]),
    "search without held-out data": ({"grid": None, "search": {"space": {"rank": [2]}}, "data": {
        "source": "chatterbot", "eval_fraction": 0}}, ["search", "needs held-out data"]),
    "search target modules the model lacks": ({"grid": None, "search": {"space": {"target_modules": [
        ["q_proj"], ["qkv_proj"]]}}}, ["'qkv_proj'", "search.space.target_modules[1]"]),
    "objective unknown": ({"objective": "ppo"}, ["objective: 'ppo'", "sft, dpo"]),
    "beta 0": ({"defaults": {"beta": 0}}, ["defaults.beta: 0", "positive"]),
    "loss_type unknown": ({"grid": {"loss_type": ["hinge"]}}, ["grid[loss_typehinge].loss_type: 'hinge'", "sigmoid, ipo"]),
    "dpo on every token": ({"objective": "dpo", "data": {"source": "chatterbot", "train_on": "all"}},
                           ["data.train_on", "dpo scores each answer's completion tokens"]),
    "dpo with a generation metric": ({"objective": "dpo", "data": {"source": "chatterbot"}, "eval": {"metric": "exact_match"}},
                                     ["eval.metric: 'exact_match'", "reward_accuracy, reward_margin"]),
    "beta on an sft task": ({"grid": {"beta": [0.1, 0.5]}}, ["grid.beta", "objective: dpo only"]),
    "dpo with a sharded base": ({"objective": "dpo", "data": {"source": "chatterbot"}, "shard_base": True},
                                ["shard_base: True", "replicated"]),
    "tasks of two objectives": ({"tasks": [{"name": "a"}, {"name": "b", "objective": "dpo"}]},
                                ["tasks[b].objective", "a run trains one objective"]),
    "eval signal without held-out data": ({"monitor": {"signal": "eval"}, "data": {"source": "chatterbot",
                                                                                   "eval_fraction": 0}},
                                          ["monitor.signal", "eval_fraction"]),
}


@pytest.mark.parametrize("change,words", SWEEP_VALUES.values(), ids=SWEEP_VALUES.keys())
def test_bad_sweep_value(tmp_path, capsys, monkeypatch, sweep_yaml, change, words):
    if "'nope'" in words and importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("topics are checked against chatterbot-corpus, not installed here (CI installs it)")
    monkeypatch.chdir(tmp_path)
    assert_one_line_exit_2(["tune", sweep_yaml(**change)], capsys, words)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_device_without_a_gpu(tmp_path, capsys, sweep_yaml):
    assert_one_line_exit_2(["tune", sweep_yaml(device="cuda")], capsys, ["device: cuda", "no CUDA GPU"])
    assert not (tmp_path / "run").exists()


# ---- alto tune: files and flags ---------------------------------------------------------------------

def _data_file(content: bytes, source: str = "jsonl", **extra):
    """A sweep (with these top-level keys) whose data file (bad.jsonl or bad.text) holds `content`."""
    def make(tmp_path, sweep_yaml):
        data = tmp_path / f"bad.{source}"
        data.write_bytes(content)
        return ["tune", sweep_yaml(data={"source": source, "path": str(data)}, **extra)]
    return make


def _sweep_file(content: bytes):
    def make(tmp_path, sweep_yaml):
        path = tmp_path / "bad.yaml"
        path.write_bytes(content)
        return ["tune", path]
    return make


def _broken_checkpoint(damage):
    """A run stopped after 2 micro-steps whose checkpoint.pt is then damaged; --resume it."""
    def make(tmp_path, sweep_yaml):
        path = sweep_yaml(out="done")
        assert main(["tune", str(path), "--stop-after", "2"]) == 0
        damage(tmp_path / "done" / "checkpoint.pt")
        return ["tune", "--resume", tmp_path / "done"]
    return make


def _foreign_adapter(checkpoint):
    state = torch.load(checkpoint, weights_only=False)
    state["adapters"]["stranger"] = next(iter(state["adapters"].values()))
    torch.save(state, checkpoint)


def _other_tasks(checkpoint):
    state = torch.load(checkpoint, weights_only=False)
    state["search"] = {"elsewhere": None}  # the searchers of a sweep whose tasks differ
    torch.save(state, checkpoint)


def _older_format(checkpoint):
    state = torch.load(checkpoint, weights_only=False)
    del state["format"]  # what checkpoints of format 1 lacked
    torch.save(state, checkpoint)


def _run_folder_then(*flags):
    """A run stopped after 2 micro-steps, then `alto tune` with flags ({run} = its folder)."""
    def make(tmp_path, sweep_yaml):
        path = sweep_yaml(out="done")
        assert main(["tune", str(path), "--stop-after", "2"]) == 0
        return ["tune", *(str(f).format(run=tmp_path / "done", sweep=path) for f in flags)]
    return make


TUNE_FILES_AND_FLAGS = {
    "sweep file missing": (lambda t, s: ["tune", t / "nope.yaml"], ["no such sweep file", "nope.yaml"]),
    "sweep file is a folder": (lambda t, s: ["tune", t], ["sweep file", "is a folder"]),
    "sweep file empty": (_sweep_file(b""), ["bad.yaml", "mapping"]),
    "sweep file binary": (_sweep_file(BINARY), ["bad.yaml:1", "not UTF-8"]),
    "sweep file a YAML list": (_sweep_file(b"- 1\n- 2\n"), ["bad.yaml", "mapping"]),
    "sweep file not YAML": (_sweep_file(b"name: x\ngrid: {rank: [1, 2\n"), ["bad.yaml:", "not valid YAML"]),
    "unknown keys of mixed types": (_sweep_file(b"colour: red\nyes: 1\ngrid: {rank: [2]}\n"), ["unknown key"]),
    "data file empty": (_data_file(b""), ["no records found"]),
    "data file binary": (_data_file(b'{"text": "ok"}\n' + BINARY), ["bad.jsonl:2", "not UTF-8"]),
    "data line not JSON": (_data_file(b'{"text": "ok"}\n{"text": \n'), ["bad.jsonl:2", "not valid JSON"]),
    "data record without text": (_data_file(b'{"text": "ok"}\n{"label": 1}\n'), ["bad.jsonl:2", "'text'"]),
    "data record a list": (_data_file(b'[1, 2]\n'), ["bad.jsonl:1", "'text'"]),
    "data messages without an assistant turn": (_data_file(b'{"messages": [{"role": "user", "content": "hi"}]}\n'),
                                                ["bad.jsonl:1", "at least one assistant turn"]),
    "data message of an unknown role": (_data_file(b'{"text": "ok"}\n{"messages": [{"role": "bot", "content": "x"}]}\n'),
                                        ["bad.jsonl:2", "roles system, user, assistant, tool"]),
    "data prompt a string, completion messages": (
        _data_file(b'{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}\n'),
        ["bad.jsonl:1", "must both be strings or both lists"]),
    "preference record without rejected": (_data_file(b'{"prompt": "a", "chosen": "b"}\n', objective="dpo"),
                                           ["bad.jsonl:1", "'prompt', 'chosen' and 'rejected'"]),
    "preference record of strings and messages": (_data_file(
        b'{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}\n', objective="dpo"),
        ["bad.jsonl:1", "all strings or all lists"]),
    "preference answers of the user": (_data_file(
        b'{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
        b'"rejected": [{"role": "assistant", "content": "c"}]}\n', objective="dpo"), ["bad.jsonl:1", "role must be assistant"]),
    "dpo over a text record": (_data_file(b'{"text": "ok"}\n', objective="dpo"),
                               ["bad.jsonl:1", "not a preference pair", "objective dpo"]),
    "sft over a preference record": (_data_file(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'),
                                     ["bad.jsonl:1", "is a preference pair", "objective dpo"]),
    "data path a folder": (lambda t, s: ["tune", s(data={"source": "jsonl", "path": str(t)})],
                           ["data.path", "is not a file"]),
    "text data binary": (_data_file(b"hello\n\n" + BINARY, "text"), ["bad.text:3", "not UTF-8", "byte 0x80"]),
    "stop-after -1": (lambda t, s: ["tune", s(), "--stop-after", "-1"], ["--stop-after", "-1 must be >= 1"]),
    "stop-after 0": (lambda t, s: ["tune", s(), "--stop-after", "0"], ["--stop-after", "0 must be >= 1"]),
    "stop-after a word": (lambda t, s: ["tune", s(), "--stop-after", "x"], ["--stop-after", "'x' is not an int"]),
    "nproc 0": (lambda t, s: ["tune", s(), "--nproc", "0"], ["--nproc", "0 must be >= 1"]),
    "unknown flag": (lambda t, s: ["tune", s(), "--epochs", "3"], ["unrecognized arguments: --epochs"]),
    "resume a folder without a run": (lambda t, s: ["tune", "--resume", t], ["--resume", "not a run folder"]),
    "resume and a sweep file": (_run_folder_then("{sweep}", "--resume", "{run}"), ["not both"]),
    "output holds a run": (_run_folder_then("{sweep}"), ["holds a run already", "--resume"]),
    "output is a file": (lambda t, s: ["tune", s(output=str(t / "data.jsonl"))], ["output", "is a file"]),
    "checkpoint truncated": (_broken_checkpoint(lambda c: c.write_bytes(c.read_bytes()[:100])),
                             ["checkpoint.pt", "not a checkpoint of alto tune"]),
    "checkpoint of another sweep": (_broken_checkpoint(_foreign_adapter), ["checkpoint.pt", "'stranger'"]),
    "checkpoint of other tasks": (_broken_checkpoint(_other_tasks), ["checkpoint.pt", "'elsewhere'"]),
    "checkpoint of an older format": (_broken_checkpoint(_older_format), ["checkpoint.pt", "format 1"]),
    "bad model on two ranks": (lambda t, s: ["tune", s(model={"hf_dir": str(t)}), "--nproc", "2"],
                               ["model.hf_dir", "cannot load"]),
}


@pytest.mark.parametrize("make,words", TUNE_FILES_AND_FLAGS.values(), ids=TUNE_FILES_AND_FLAGS.keys())
def test_bad_tune_file_or_flag(tmp_path, capfd, monkeypatch, sweep_yaml, make, words):
    monkeypatch.chdir(tmp_path)
    argv = make(tmp_path, sweep_yaml)
    capfd.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_exit_2(argv, capfd, words)  # capfd: ranks are processes of their own
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# ---- alto simulate ------------------------------------------------------------------------------------

HEADER = "arrival_s,task,base_model,configs,tokens,gpus\n"


def _trace(name: str, content: bytes, *flags: str):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        return ["simulate", path, *flags]
    return make


def _pai(job_table: bytes):
    def make(tmp_path):
        (tmp_path / "pai_task_table.csv").write_text("j1,worker,2,Terminated,1000,4600,600,29,100,V100\n")
        (tmp_path / "pai_job_table.csv").write_bytes(job_table)
        return ["simulate", tmp_path / "pai_job_table.csv", "--format", "pai"]
    return make


SIMULATE = {
    "trace missing": (lambda t: ["simulate", t / "missing.csv"], ["no such trace file", "missing.csv"]),
    "trace is a folder": (lambda t: ["simulate", t], ["is a folder"]),
    "trace empty": (_trace("t.csv", b""), ["t.csv", "missing column"]),
    "trace binary": (_trace("t.csv", HEADER.encode() + BINARY), ["t.csv:2", "not UTF-8"]),
    "trace missing a column": (_trace("t.csv", b"arrival_s,task,base_model,configs,tokens\n0,a,llama-3-8b,1,1\n"),
                               ["missing column", "gpus"]),
    "arrival negative": (_trace("t.csv", (HEADER + "-1,a,llama-3-8b,1,1,1\n").encode()), ["t.csv:2", "arrival_s"]),
    "arrival a word": (_trace("t.csv", (HEADER + "soon,a,llama-3-8b,1,1,1\n").encode()),
                       ["t.csv:2", "arrival_s='soon'"]),
    "base model unknown": (_trace("t.csv", (HEADER + "0,a,gpt-5,1,1,1\n").encode()), ["base_model='gpt-5'"]),
    "configs 0": (_trace("t.csv", (HEADER + "0,a,llama-3-8b,0,1,1\n").encode()), ["configs=0"]),
    "task twice": (_trace("t.csv", (HEADER + "0,a,llama-3-8b,1,1,1\n1,a,llama-3-8b,1,1,1\n").encode()),
                   ["task names repeat"]),
    "more GPUs than the cluster": (_trace("t.csv", (HEADER + "0,a,llama-3-8b,1,1,99\n").encode()),
                                   ["more than the cluster"]),
    "philly JSON an object": (_trace("log.json", b'{"jobs": []}', "--format", "philly"),
                              ["log.json", "JSON list of jobs"]),
    "philly JSON a list of numbers": (_trace("log.json", b"[1, 2]", "--format", "philly"),
                                      ["log.json: job 0", "not a Philly job record"]),
    "philly job without attempts list": (
        _trace("log.json", json.dumps([{"jobid": "j", "status": "Pass", "attempts": 5}]).encode(), "--format",
               "philly"), ["job 0 ('j')", "not a Philly job record"]),
    "philly JSON invalid": (_trace("log.json", b'[{"jobid": }]', "--format", "philly"),
                            ["log.json:1", "not valid JSON"]),
    "philly CSV missing columns": (_trace("philly.csv", b"jobid,num_gpus\nj,1\n", "--format", "philly"),
                                   ["missing column", "submitted_time"]),
    "philly CSV short row": (_trace("philly.csv", b"jobid,submitted_time,num_gpus,duration,user\nj,0,1\n",
                                    "--format", "philly"), ["philly.csv:2", "5 fields expected"]),
    "CSV field too large": (_trace("t.csv", (HEADER + "0,a" + "x" * 200_000 + ",llama-3-8b,1,1,1\n").encode()),
                            ["t.csv:2", "not valid CSV"]),
    "arrival of 400 digits": (_trace("t.csv", (HEADER + "9" * 400 + ",a,llama-3-8b,1,1,1\n").encode()),
                              ["t.csv:2", "arrival_s"]),
    "pai run time out of range": (_pai(b"j1,i1,u1,Terminated,0,1e308\n"), ["job 'j1'", "out of range"]),
    "pai task table missing": (_trace("pai_job_table.csv", b"j1,i1,u1,Terminated,1000,4600\n", "--format", "pai"),
                               ["no such trace file", "pai_task_table.csv"]),
    "pai wrong column count": (_pai(b"j1,i1,u1\n"), ["pai_job_table.csv:1", "expected 6 columns"]),
    "gpus 0": (lambda t: ["simulate", "--gpus", "0"], ["--gpus", "0 must be >= 1"]),
    "format unknown": (lambda t: ["simulate", "--format", "slurm"], ["--format", "invalid choice"]),
    "out is a file": (_trace("f.txt", b"x", "--out", "f.txt"), ["--out", "is a file"]),
}


@pytest.mark.parametrize("make,words", SIMULATE.values(), ids=SIMULATE.keys())
def test_bad_simulate_input(tmp_path, capsys, monkeypatch, make, words):
    monkeypatch.chdir(tmp_path)
    argv = make(tmp_path)
    assert_one_line_exit_2(argv, capsys, words)
    assert not list(tmp_path.rglob("*.png"))  # nothing written


# ---- alto submit / cluster / status / cancel ----------------------------------------------------------

def _queue_sweep(tmp_path, **change) -> str:
    (tmp_path / "d.txt").write_text("alpha beta gamma\n" * 20)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"name": "s", "device": "cpu", "model": {"random_llama": TINY_LLAMA},
                                "data": {"source": "text", "path": str(tmp_path / "d.txt")},
                                "adapters": [{"id": "a"}], **change}))
    return str(path)


def _queued_already(tmp_path) -> list:
    from alto import task_queue

    task_queue.submit(tmp_path / "q", _queue_sweep(tmp_path), 1)
    return ["submit", _queue_sweep(tmp_path), "--queue", tmp_path / "q"]


def _ended(tmp_path) -> list:
    from alto import task_queue

    task_queue.submit(tmp_path / "q", _queue_sweep(tmp_path), 1)
    task_queue.update_task(tmp_path / "q", "s", state="done")
    return ["cancel", "s", "--queue", tmp_path / "q"]


QUEUE = {
    "sweep missing": (lambda t: ["submit", t / "missing.yaml", "--queue", t / "q"], ["missing.yaml"]),
    "sweep value bad": (lambda t: ["submit", _queue_sweep(t, checkpoint_every=0), "--queue", t / "q"],
                        ["checkpoint_every", "0"]),
    "gpus 0": (lambda t: ["submit", _queue_sweep(t), "--gpus", "0", "--queue", t / "q"], ["--gpus", "0 must be >= 1"]),
    "queue is a file": (lambda t: ["submit", _queue_sweep(t), "--queue", _queue_sweep(t)], ["--queue", "is a file"]),
    "task name taken": (_queued_already, ["a task named 's'", "already"]),
    "cancel unknown task": (lambda t: ["cancel", "nope", "--queue", t / "q"], ["no task 'nope'"]),
    "cancel an ended task": (_ended, ["task 's'", "has ended (done)"]),
    "status of a queue never served": (lambda t: ["status", "--queue", t / "q"], ["no driver has served"]),
    "policy unknown": (lambda t: ["cluster", "--policy", "lottery"], ["--policy", "invalid choice"]),
    "gpu type unknown": (lambda t: ["cluster", _queue_sweep(t), "--queue", t / "q", "--gpu-type", "V100"],
                         ["gpu type 'V100' is unknown"]),
    "cluster sweep value bad": (lambda t: ["cluster", _queue_sweep(t), _queue_sweep(t, packing=3), "--queue", t / "q"],
                                ["packing"]),
    "linger negative": (lambda t: ["cluster", "--linger", "-1"], ["--linger", "must be >= 0"]),
    "two sweeps of one name": (lambda t: ["cluster", _queue_sweep(t), _queue_sweep(t), "--queue", t / "q"],
                               ["two of the sweep files are named 's'"]),
    "address without a port": (lambda t: ["cluster", "--address", "headnode", "--queue", t / "q"],
                               ["--address 'headnode'", "HOST:PORT"]),
    "address where nothing answers": (lambda t: ["submit", _queue_sweep(t), "--address", f"127.0.0.1:{free_port()}",
                                                 "--queue", t / "q"], ["--address", "nothing answers there"]),
}


@pytest.mark.parametrize("make,words", QUEUE.values(), ids=QUEUE.keys())
def test_bad_queue_input(tmp_path, capsys, monkeypatch, make, words):
    pytest.importorskip("ray")  # without it every queue command says so first (the GPU image has none)
    monkeypatch.chdir(tmp_path)
    argv = [str(a) for a in make(tmp_path)]
    before = sorted(p for p in tmp_path.rglob("*"))
    assert_one_line_exit_2(argv, capsys, words)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


# ---- alto check ---------------------------------------------------------------------------------------

CHECK = {
    "device tpu": (["check", "--device", "tpu"], ["--device", "invalid choice"]),
    "seed a word": (["check", "--seed", "x"], ["--seed", "'x' is not an int"]),
    "seed too large": (["check", "--seed", str(2**64)], ["--seed", "must be < 9223372036854775808"]),
    "no command": ([], ["required"]),
    "unknown command": (["train"], ["invalid choice", "'train'"]),
}


@pytest.mark.parametrize("argv,words", CHECK.values(), ids=CHECK.keys())
def test_bad_check_or_command(capsys, argv, words):
    assert_one_line_exit_2(argv, capsys, words)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_check_on_cuda_without_a_gpu(capsys):
    assert_one_line_exit_2(["check", "--device", "cuda"], capsys, ["--device cuda", "no CUDA GPU"])


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="no such sweep file"):
        main(["tune", str(tmp_path / "nope.yaml"), "--debug"])


def test_an_internal_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import alto.sched.sim

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(alto.sched.sim, "compare", lambda *a: {}["planted"])
    assert main(["simulate", "--out", "."]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "internal error: KeyError" in err and "--debug" in err


# ---- the op library's wrappers -----------------------------------------------------------------------

def _ops_args():
    x, W = torch.randn(7, 16), torch.randn(5, 16)
    seg, rank = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
    return x, W, seg, rank


OPS = {  # id: (call, words of the ValueError)
    "x a list": (lambda x, W, s, r: alto_ext.lora_shrink([[1.0]], W, s, r, 8), ["x must be a torch.Tensor"]),
    "W None": (lambda x, W, s, r: alto_ext.lora_shrink(x, None, s, r, 8), ["W must be a torch.Tensor"]),
    "h_width a string": (lambda x, W, s, r: alto_ext.lora_shrink(x, W, s, r, "8"), ["h_width must be an int"]),
    "total_rank a float": (lambda x, W, s, r: alto_ext.lora_weight_grad(torch.randn(7, 8), x, s, r, 5.0),
                           ["total_rank must be an int"]),
    "y of ints": (lambda x, W, s, r: alto_ext.lora_expand_(torch.zeros(7, 4, dtype=torch.long), torch.randn(7, 8),
                                                           torch.randn(5, 4), s, r), ["floating-point"]),
    "float64 scaling for float32 operands": (
        lambda x, W, s, r: alto_ext.lora_shrink(x, W, s, r, 8, torch.ones(2, dtype=torch.float64)),
        ["scaling must be float32"]),
    "linear x 3-D": (lambda x, W, s, r: alto_ext.multi_lora_linear(x[None], torch.randn(4, 16), None, W,
                                                                   torch.randn(5, 4), Segments.build([3, 4], [2, 3])),
                     ["x must be [T, d_in]"]),
    "linear weight columns": (lambda x, W, s, r: alto_ext.multi_lora_linear(
        x, torch.randn(4, 15), None, W, torch.randn(5, 4), Segments.build([3, 4], [2, 3])), ["weight must be"]),
    "linear bias shape": (lambda x, W, s, r: alto_ext.multi_lora_linear(
        x, torch.randn(4, 16), torch.randn(3), W, torch.randn(5, 4), Segments.build([3, 4], [2, 3])),
        ["bias must be"]),
    "linear tokens": (lambda x, W, s, r: alto_ext.multi_lora_linear(
        x, torch.randn(4, 16), None, W, torch.randn(5, 4), Segments.build([3, 5], [2, 3])),
        ["x has 7 tokens but the segments cover 8"]),
    "linear A rows, one adapter": (lambda x, W, s, r: alto_ext.multi_lora_linear(
        x, torch.randn(4, 16), None, torch.randn(8, 16), torch.randn(8, 4), Segments.build([7], [5])),
        ["A (8, 16) and B (8, 4)", "need A (5, 16) and B (5, 4)"]),
    "linear B columns, one adapter": (lambda x, W, s, r: alto_ext.multi_lora_linear(
        x, torch.randn(4, 16), None, torch.randn(5, 16), torch.randn(5, 6), Segments.build([7], [5])),
        ["B (5, 6)", "B (5, 4)"]),
    "segments of strings": (lambda x, W, s, r: Segments.build("ab", [1, 2]), ["token_counts[0]"]),
    "unpack into too much": (lambda x, W, s, r: alto_ext.unpack_tensors(torch.zeros(3, dtype=torch.uint8),
                                                                          [torch.empty(4)]), ["holds 3 bytes"]),
}


@pytest.mark.parametrize("call,words", OPS.values(), ids=OPS.keys())
def test_bad_op_argument_is_a_value_error_naming_it(call, words):
    with pytest.raises(ValueError) as err:
        call(*_ops_args())
    for w in words:
        assert w in str(err.value), str(err.value)


def test_check_errors_is_a_no_op_with_nothing_pending():
    """On any machine (a CUDA build on a machine without a GPU included) and after CPU ops."""
    alto_ext.check_errors()
    alto_ext.lora_shrink(*_ops_args(), 8)
    alto_ext.check_errors()
