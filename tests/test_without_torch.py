"""Without torch: data-free and least-squares pruning work, gradient options say how to get the extra."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import ROOT, sample

# One interpreter in which `import torch` raises ModuleNotFoundError, as when it is not installed (an
# import hook rather than sys.modules['torch'] = None, which scipy's array-API probing trips over).
# It runs the CLI once per argument list and prints {exit code, stderr, output written} for each.
HIDDEN = """
import contextlib, importlib.abc, io, json, os, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, NoTorch())
from onnx_intrafusion.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append({"code": code, "stderr": err.getvalue(), "written": os.path.exists(argv[1])})
    if os.path.exists(argv[1]):
        os.remove(argv[1])
results.append({"torch_imported": "torch" in sys.modules})
print(json.dumps(results))
"""


def test_without_torch_data_free_and_lstsq_work_and_gradient_options_name_the_extra(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    src, out = str(sample("digits/digits_cnn.onnx")), str(tmp_path / "p.onnx")
    runs = [[src, out, "--sparsity", "0.5"],
            [src, out, "--sparsity", "0.5", "--calibration", str(calib)],
            [src, out, "--calibration", str(calib), "--recover", "distill"],
            [src, out, "--calibration", str(calib), "--importance", "taylor"],
            [src, out, "--calibration", str(calib), "--importance", "prospr"]]
    proc = subprocess.run([sys.executable, "-c", HIDDEN, json.dumps(runs)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *results, final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not final["torch_imported"]
    for ok in results[:2]:
        assert ok["code"] == 0 and ok["written"], ok["stderr"]
    for bad in results[2:]:
        lines = bad["stderr"].strip().splitlines()
        assert bad["code"] == 2 and not bad["written"]
        assert len(lines) == 1 and "pip install onnx-intrafusion[torch]" in lines[0], bad["stderr"]
