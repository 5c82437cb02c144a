"""bench_step's PEFT line alone, in a fresh process: one PEFT step (rank 8, all 7 projections, one
1024-token sequence) over the same base, with or without ALTO's wrappers installed first (WRAP=1|0),
liger's fused-layer calls counted (PEFT never runs inside a co-located forward: it must read 0).
Run a few times to see the spread of that line on a host: python bench/peft_step_alone.py"""
import os

import torch

from alto import fused_layers
from alto.model import MultiLoraModel
from bench_step import build_model, peft_step_ms


def main() -> None:
    device = torch.device("cuda")
    base = build_model("1b", 16, device)
    if os.environ.get("WRAP", "1") == "1":
        MultiLoraModel(base)  # installs the fused layers; peft_step_ms unwraps the LoRA layers
    calls = 0
    for fn in fused_layers._liger():
        def counted(*args, _original=fn.apply):
            nonlocal calls
            calls += 1
            return _original(*args)
        fn.apply = counted
    base.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    seq = torch.randint(1, base.config.vocab_size, (1024,)).tolist()
    print(f"PEFT {peft_step_ms(base, seq, 20, device):.1f} ms/step, liger calls {calls}", flush=True)


if __name__ == "__main__":
    main()
