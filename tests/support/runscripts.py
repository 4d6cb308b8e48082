"""Run several scripts one after another in this one Python, each as `python SCRIPT ARGS...`
would run it (as `__main__`, its own folder first on sys.path, its own sys.argv), and print
one JSON object: for each script its exit code, stdout and stderr.

    python -m tests.support.runscripts '[["bench/cpu_path.py", "--quick"], ["bench/refine.py", "--quick"]]'

For scripts that each import torch (seconds of CPU per import): one import serves them all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import traceback


def run_script(argv: list) -> dict:
    path = os.path.abspath(argv[0])
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv[1:]]
    sys.path.insert(0, os.path.dirname(path))
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message"): Python prints it and exits with 1
                    err.write(f"{exc.code}\n")
                    code = 1
            except BaseException:  # the script's own crash: reported like Python would
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> int:
    results = [run_script(argv) for argv in json.loads(sys.argv[1])]
    sys.stdout.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
