"""The process `solve_equation` runs sympy in (solver.py starts it; not a command for people).

Reads one JSON request per line on stdin ({"equation": ..., "variables": [...]}) and writes one JSON
answer per line on stdout ({"ok": true, "text": ...} or {"ok": false, "error": ...}). The parent kills
the process group when a solve runs past its time, so sympy really stops; an address-space limit keeps
a runaway solve from taking the machine's memory.
"""

from __future__ import annotations

import json
import resource
import sys

MEMORY_LIMIT_BYTES = 2 << 30


def main() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):  # a lower hard limit is already in place
        pass
    from hearth.agents.tools.solver import SolverError, solve_in_process

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing sympy prints may corrupt the answers
    for line in sys.stdin:
        req = json.loads(line)
        try:
            answer = {"ok": True, "text": solve_in_process(req["equation"], req.get("variables"))}
        except SolverError as e:
            answer = {"ok": False, "error": str(e)}
        except MemoryError:
            answer = {"ok": False, "error": "the equation needs too much memory to solve"}
        except RecursionError:
            answer = {"ok": False, "error": "the equation is nested too deeply"}
        except Exception as e:  # sympy's own failures go back to the model as text
            answer = {"ok": False, "error": f"cannot solve: {type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
