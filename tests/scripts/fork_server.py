"""Runs a script's `main(argv)` in forked children, paying for Python, torch and ladle once.

python fork_server.py SCRIPT.py

Reads one command per line on stdin: `run ARG ARG ...` (a JSON list after `run `).
For each it forks a child that prints `pid N`, runs `main(argv)` of SCRIPT (whose own
output goes to the same stdout), and exits with its return value. The server waits for
the child and prints `exit CODE` (`exit -9` when the child was SIGKILLed). Each child is
a real process with its own files and locks, so killing it is a real crash; what it saves
is as if a fresh interpreter had run the script, because nothing ran before the fork but
imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def main(script: str) -> int:
    spec = importlib.util.spec_from_file_location("forked_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports torch and ladle once, here
    if hasattr(module, "warm_up"):
        module.warm_up()  # what the script imports lazily, once (it must start no threads)
    print("server ready", flush=True)
    for line in sys.stdin:
        if not line.startswith("run "):
            continue
        argv = json.loads(line[4:])
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                print(f"pid {os.getpid()}", flush=True)
                code = int(module.main(argv) or 0)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # no atexit handlers of the server in the child
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"exit {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
