"""The source tree stays the way the README describes it: no import circle among the packages'
modules, no module over 300 lines without its reason in its docstring, and the README's layout
table naming every path and module there is."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "python"
PACKAGES = ("alto", "alto_ext")
EXTENSIONS = {"alto_ext._C"}  # compiled, imports nothing of ours


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCES).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SOURCES.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Our modules this one imports (any depth: inside functions too). `from pkg import sub` of a
    submodule depends on the submodule; Python initializes the package first in any case."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            out.update(s for s in subs if s in known)
            if any(s not in known for s in subs):
                out.add(node.module)
    return out & known


def test_no_import_circle_among_the_modules():
    mods = modules()
    known = set(mods) | EXTENSIONS
    graph = {m: imports(p, known) - {m} for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            visit(dep)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_no_module_over_300_lines_without_a_reason():
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert lines <= 300 or "300 lines" in doc, f"{name}: {lines} lines and no reason in its docstring"


def test_the_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for row in rows:
        for path in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            assert (ROOT / path).exists(), f"README layout names {path}, which does not exist"
    for folder in ("python/alto/", "python/alto/sched/", "python/alto_ext/"):
        row = next(r for r in rows if r.startswith(f"| `{folder}` |"))
        named = set(re.findall(r"`(\w+)`", row.split(" | ", 1)[1]))
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.stem != "__init__":
                assert path.stem in named, f"README layout row {folder} does not name {path.stem}"
    for path in sorted((ROOT / "csrc").iterdir()):
        if path.is_dir():
            assert f"`csrc/{path.name}/`" in table, f"README layout does not name csrc/{path.name}/"


def test_the_sweep_spec_and_the_queue_commands_need_neither_torch_nor_the_compiled_library(tmp_path):
    """Sweep files parse and check (tasks, a metric, a monitor) and alto submit (up to its driver,
    which trains and needs both), status, cancel, simulate and --version run in a process where
    importing torch or alto_ext fails: they work on a machine (a login node, a laptop) where neither
    is built."""
    import json
    import subprocess
    import sys

    sweep = {"name": "s", "model": {"random_llama": {"hidden_size": 64, "num_attention_heads": 4}}, "device": "auto",
             "data": {"source": "jsonl", "path": "d.jsonl", "max_length": 64},
             "tasks": [{"name": "a", "grid": {"lr": [1e-4, 1e-3]}, "eval": {"every": 2, "metric": "exact_match"},
                        "monitor": {"rule": "asha"}}, {"name": "b", "adapters": [{"id": "r8", "rank": 8}]}]}
    (tmp_path / "s.yaml").write_text(json.dumps(sweep))
    (tmp_path / "d.jsonl").write_text('{"text": "a record"}\n')
    script = f"""
import importlib.abc, importlib.util, socket, sys
class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "alto_ext"):
            raise ImportError(name + " is made unimportable by this test")
sys.meta_path.insert(0, Unimportable())
from alto import task_queue
from alto.cli import main
from alto.sweep import DEFAULT_SWEEP, parse_sweep
assert len(parse_sweep(DEFAULT_SWEEP).adapters) == 8
# alto submit up to its driver: Ray taken as installed, a driver that serves at once, an address that answers
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: object() if name == "ray" else find_spec(name, *a)
task_queue.start_driver = lambda queue, flags: None
listener = socket.create_server(("127.0.0.1", 0))
address = "127.0.0.1:%d" % listener.getsockname()[1]
queue = {str(tmp_path / "q")!r}
codes = [main(["submit", "s.yaml", "--queue", queue, "--address", address]), main(["cancel", "s", "--queue", queue]),
         main(["status", "--queue", queue]), main(["simulate", "--gpus", "4", "--out", "."]), main(["--version"])]
print("codes", codes, "imported", sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "alto_ext"}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # status of a queue no driver has served yet: its one line (exit code 2), not an import error
    assert "codes [0, 0, 2, 0, 0] imported []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "submitted s to" in out.stdout and "cancelled" in out.stdout and "no driver has served" in out.stderr
    assert "simulate.png" in out.stdout and "(torch not installed)" in out.stdout


def test_the_kernel_tile_candidates_are_written_in_one_header():
    """Tile shapes appear in csrc/cuda/tile_configs.cuh alone: the kernels and bench/tile_configs.cu
    choose from its candidates by index (a cluster shape of ones is not a tile)."""
    tile = re.compile(r"Shape<\s*_(\d+),\s*_(\d+),\s*_(\d+)\s*>")
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    for path in sources + sorted((ROOT / "bench").glob("*.cu")):
        if path.name != "tile_configs.cuh":
            shapes = [m.group(0) for m in tile.finditer(path.read_text()) if m.groups() != ("1", "1", "1")]
            assert not shapes, f"{path.relative_to(ROOT)} writes tile shapes of its own: {shapes}"
    assert len(tile.findall((ROOT / "csrc" / "cuda" / "tile_configs.cuh").read_text())) >= 2
