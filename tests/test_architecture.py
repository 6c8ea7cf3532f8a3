"""The package's import rules (see the README, "Read these files first").

* The import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``): the layers, no cycles
  between packages, ``ringrt.ops`` imports no other ringrt package, the runtime never imports the
  tools (bench, simulate, gpucheck), nothing imports the Hydra run configs. Imports inside function
  bodies count. The same check from a shell: ``lint-imports``.
* ``ringrt.ops`` never imports ``torch.distributed`` (import-linter sees only top-level external
  packages, so this one reads the source).
* ``import ringrt`` stays light: it loads the attention runtime (torch), not the Hugging Face,
  Hydra, DeepSpeed or plotting stacks, nor the jobs and tools. ``torch.distributed`` itself is not
  checked: ``import torch`` (2.6 and later) already imports it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_import_contracts_hold():
    code = ("import sys\nfrom importlinter.cli import lint_imports\n"
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    r = _run(code)
    report = r.stdout + r.stderr
    assert r.returncode == 0, (f"an import rule of pyproject.toml [tool.importlinter] is broken "
                               f"(lint-imports exit {r.returncode}):\n{report[report.find('Broken contracts'):] or report}")
    assert "0 broken" in report, report


def _imports(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import statement, function bodies included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name, node.level) for a in node.names]
    return out


def test_ops_never_imports_torch_distributed():
    bad = []
    for path in sorted((ROOT / "ringrt" / "ops").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name, level in _imports(tree):
            if level == 0 and (name == "torch.distributed" or name.startswith("torch.distributed.")):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
        for node in ast.walk(tree):  # `torch.distributed.x` reached through a plain `import torch`
            if isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses torch.distributed")
    assert not bad, ("ringrt.ops is math on one device and never uses torch.distributed; communication belongs in "
                     "ringrt.distributed and is passed in:\n" + "\n".join(bad))


HEAVY = ("safetensors", "transformers", "hydra", "omegaconf", "deepspeed", "matplotlib", "wandb", "tokenizers",
         "torch.distributed.checkpoint", "ringrt.model.hf", "ringrt.jobs", "ringrt.compression",
         "ringrt.bench", "ringrt.simulate", "ringrt.gpucheck")


def test_import_ringrt_is_light():
    code = f"""
import json, sys
import ringrt
loaded = [m for m in {HEAVY!r} if m in sys.modules]
missing = [n for n in ringrt.__all__ if not hasattr(ringrt, n)]  # resolving them may load the lazy ones
print(json.dumps({{"loaded": loaded, "missing": missing, "hf_on_use": "ringrt.model.hf" in sys.modules}}))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], (f"`import ringrt` loaded {out['loaded']}: keep ringrt/__init__.py to the attention "
                                 f"runtime and make the rest lazy (module __getattr__)")
    assert out["missing"] == [], f"ringrt.__all__ names missing from the package: {out['missing']}"
    assert out["hf_on_use"], "ringrt.load_pretrained should load ringrt.model.hf on first use"


def test_lazy_names_are_the_real_functions():
    import ringrt
    from ringrt.model import hf

    from ringrt.model import parallel

    assert ringrt.load_pretrained is hf.load_pretrained and ringrt.save_pretrained is hf.save_pretrained
    assert ringrt.sequence_loss is parallel.sequence_loss and ringrt.sum_gradients is parallel.sum_gradients
    assert {"load_pretrained", "save_pretrained", "sequence_loss", "sum_gradients"} <= set(dir(ringrt))
    with pytest.raises(AttributeError, match="no_such_name"):
        ringrt.no_such_name  # noqa: B018
