"""Smoke test of an installed flora_ext wheel; tools/wheel_test.sh runs it in a fresh venv,
from an empty directory, with no compiler on PATH, and sets FLORA_TORCH_REQUIREMENT to the
torch pin the wheel must declare (the build's torch)."""
import os
import re
import shutil
from importlib import metadata

import torch

import flora_ext

assert "site-packages" in flora_ext.__file__, f"not the installed wheel: {flora_ext.__file__}"
# The wheel pins the torch release it was built against, and this venv's torch is that one.
requires = [r for r in metadata.requires("flora_ext") or []
            if re.match(r"torch\s*([<>=!~;\[]|$)", r)]
installed = "torch==" + metadata.version("torch").split("+")[0]
expected = os.environ.get("FLORA_TORCH_REQUIREMENT", installed)
assert requires == [expected] == [installed], (
    f"Requires-Dist on torch: {requires}, expected [{expected!r}] (installed: {installed})")
for compiler in ("cc", "c++", "gcc", "g++", "nvcc"):
    assert shutil.which(compiler) is None, f"{compiler} is on PATH: no compiler-free test"

p = torch.nn.Parameter(torch.randn(16, 40))
opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=4, kappa=2)
before = p.detach().clone()
for _ in range(3):
    p.grad = torch.randn_like(p)
    opt.step()
assert not torch.equal(p, before)
assert opt.state[p]["momentum"].shape == (4, 40) and opt.state[p]["step"] == 3

package = os.path.dirname(flora_ext.__file__)
config = os.path.join(flora_ext.cmake_prefix_path, "Flora", "FloraConfig.cmake")
for path in (config, os.path.join(flora_ext.cmake_prefix_path, "Flora", "FloraConfigVersion.cmake"),
             os.path.join(package, "include", "flora", "flora.h"),
             os.path.join(package, "include", "flora", "ops.h"), flora_ext.library_path):
    assert os.path.isfile(path), f"missing from the wheel: {path}"
print(f"flora_ext {flora_ext.__version__} from {package}: requires {requires[0]}, "
      f"torch {torch.__version__}, "
      f"CUDA kernels {flora_ext.cuda_compiled()}, one step OK; "
      f"cmake_prefix_path {flora_ext.cmake_prefix_path}")
