"""The import arrows of DESIGN.md hold: walk every module's imports and fail on a wrong one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> hearth packages it may import
ALLOWED = {
    "runtime": set(),
    "training": {"runtime"},
    "quantize": {"runtime"},
    "serve": {"runtime", "agents"},
    "agents": {"runtime"},
    "clients": {"serve", "runtime"},
}
# clients/ holds the CLI entry, which dispatches to every subsystem's commands
ALLOWED_CLI = {"runtime", "serve", "quantize", "training", "agents"}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel_parts = path.relative_to(ROOT / package).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ["hearth", package, *rel_parts]
                keep = len(base) - (node.level - 1)
                if keep < 1:
                    found.add("<outside hearth>")
                    continue
                names = [".".join(base[:keep] + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "hearth" and len(parts) > 1:
                found.add(parts[1])
    found.discard(package)
    return found


def test_import_direction():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            extra = _imports(path, package) - allowed
            if package == "clients" and path.name.startswith(("cli", "cmd_")):
                extra -= ALLOWED_CLI
            if extra:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not wrong, "imports against DESIGN.md:\n" + "\n".join(wrong)


def test_runtime_import_pulls_no_torch():
    code = ("import sys, hearth.runtime, hearth.runtime.engine, hearth.runtime.registry, "
            "hearth.runtime.checkpoint, hearth.runtime.chat_template;"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_only_ray_app_imports_ray():
    """The Ray Serve wiring lives in serve/ray_app.py; everything else runs without Ray."""
    offenders = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "serve" / "ray_app.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                if any(n == "ray" or n.startswith("ray.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
