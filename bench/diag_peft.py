import sys, torch
sys.argv = ["x"]
import bench_step
from bench_step import build_model, peft_step_ms
from alto.model import MultiLoraModel
from alto import fused_layers
device = torch.device("cuda")
base = build_model("1b", 16, device)
if sys.argv and __import__("os").environ.get("WRAP", "1") == "1":
    MultiLoraModel(base)
calls = {"n": 0}
for fn in fused_layers._liger():
    orig = fn.apply
    def counted(*a, _o=orig):
        calls["n"] += 1
        return _o(*a)
    fn.apply = counted
seq = torch.randint(1, base.config.vocab_size, (1024,)).tolist()
base.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
if True:
    print(f"PEFT {peft_step_ms(base, seq, 20, device):.1f} ms, liger calls {calls['n']}", flush=True)
