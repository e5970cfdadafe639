"""Regenerate the outputs README.md shows, by running what prints them.

    python scripts/readme_outputs.py             # print the README with fresh outputs
    python scripts/readme_outputs.py --write     # rewrite README.md in place
    python scripts/readme_outputs.py --check     # exit 1 when README.md's outputs are stale

Three kinds of blocks are regenerated (everything else is left as written):

- the output block right after the README's training loop (the ```python block that
  writes `runs/readme`): that block's own stdout, run in a scratch folder;
- every block whose lines start with `$ ladle ...`: each command, run in that folder
  after the loop (in one process, as a 100-column terminal would show it);
- the `$ make demo` block: `ladle demo`, when --demo is given (about 10 s on a quiet machine).

Outputs are compared with times, durations, sizes and the scratch folder's path
masked (`normalize`), so a README is stale only when what the code prints has changed;
the demo's block is compared by its shape (its figures depend on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
# The folder the README's outputs show; the scratch folder is renamed to it.
SHOWN_DIR = "/tmp/ladle-tour"
COLUMNS = 100
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```$", re.S | re.M)
_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "YYYY-MM-DD HH:MM:SS"),
    (re.compile(r"\b\d+(\.\d+)? s\b"), "N s"),
    # Sizes move by a few bytes from run to run (times and floats in meta.json), which can cross
    # a rounding step; file counts, names and every other number are compared as printed.
    (re.compile(r"\b\d+(\.\d+)? (B|KiB|MiB|GiB)\b"), r"N \2"),
]


# The demo trains for 30 epochs: the same code printed other figures on two machines of this
# project (its scores differ in the last places from the first epoch on, then the run diverges),
# so its block is compared by shape: rows, columns, recipes and words, every number masked.
_DEMO_MASKS = [
    (re.compile(r"\b(beats|loses|ties)\b"), "VERDICT"),
    (re.compile(r"[+-]?\d+(\.\d+)?"), "N"),
]


def normalize(text: str) -> str:
    """`text` with times and durations masked and trailing spaces dropped (for comparison)."""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    if text.startswith("$ make demo"):
        for pattern, mask in _DEMO_MASKS:
            text = pattern.sub(mask, text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def blocks(readme: str) -> list[re.Match[str]]:
    """Every fenced block of the README, in order."""
    return list(_FENCE.finditer(readme))


def _loop_output_index(readme: str) -> tuple[int, str]:
    """The index of the output block after the training loop, and the loop's code."""
    found = blocks(readme)
    for i, block in enumerate(found):
        header = readme[block.start() : readme.index("\n", block.start())]
        if header == "```python" and '"runs/readme"' in block.group(1):
            return i + 1, block.group(1)
    raise SystemExit("README.md: no ```python block writing runs/readme")


def run_loop(code: str, folder: Path) -> str:
    """Run the README's training loop in `folder`; its stdout."""
    script = folder / "readme_loop.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=folder, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode:
        raise SystemExit(f"the README's training loop failed:\n{done.stderr[-3000:]}")
    script.unlink()
    return done.stdout


def run_ladle(command: str, folder: Path) -> str:
    """`ladle ...` run in-process in `folder`, stdout and stderr as a terminal would interleave them."""
    from ladle.cli.main import main

    argv = []
    for word in shlex.split(command)[1:]:
        expanded = sorted(glob.glob(word, root_dir=folder)) if any(c in word for c in "*?[") else []
        argv.extend(expanded or [word])
    captured = io.StringIO()
    previous = os.getcwd()
    os.environ["COLUMNS"] = str(COLUMNS)
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            main(argv)
    finally:
        os.chdir(previous)
    return captured.getvalue()


def command_block(block: str, folder: Path) -> str:
    """A `$ ladle ...` block with every command's output regenerated."""
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ladle ")]
    parts = [f"$ {c}\n{run_ladle(c, folder).rstrip()}" for c in commands]
    return "\n\n".join(parts) + "\n"


def regenerate(readme: str, *, demo: bool) -> str:
    """The README with every regenerated block replaced."""
    loop_index, code = _loop_output_index(readme)
    with tempfile.TemporaryDirectory(prefix="ladle-readme-") as scratch:
        folder = Path(scratch).resolve()
        fresh: dict[int, str] = {loop_index: run_loop(code, folder)}
        for i, block in enumerate(blocks(readme)):
            body = block.group(1)
            if body.startswith("$ ladle "):
                fresh[i] = command_block(body, folder)
            elif body.startswith("$ make demo") and demo:
                out = run_ladle("ladle demo --out demo-out", folder).rstrip()
                fresh[i] = f"$ make demo\n.venv/bin/ladle demo\n{out}\n"
        text = readme
        for i, block in reversed(list(enumerate(blocks(readme)))):
            if i in fresh:
                body = fresh[i].replace(str(folder), SHOWN_DIR)
                body = "".join(line.rstrip() + "\n" for line in body.splitlines())
                text = text[: block.start(1)] + body + text[block.end(1) :]
    return text


def stale_blocks(old: str, new: str) -> list[str]:
    """The regenerated blocks whose text (normalized) differs between `old` and `new`."""
    found = []
    for a, b in zip(blocks(old), blocks(new), strict=True):
        if normalize(a.group(1)) != normalize(b.group(1)):
            found.append(b.group(1).splitlines()[0] if b.group(1) else "(empty block)")
    return found


def keep_unchanged(old: str, new: str) -> str:
    """`new`, except that blocks equal to `old`'s but for times and paths keep `old`'s text."""
    text = new
    pairs = list(zip(blocks(old), blocks(new), strict=True))
    for a, b in reversed(pairs):
        if normalize(a.group(1)) == normalize(b.group(1)):
            text = text[: b.start(1)] + a.group(1) + text[b.end(1) :]
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    parser.add_argument("--demo", action="store_true", help="also run `ladle demo` (about 10 s)")
    args = parser.parse_args()
    readme = README.read_text()
    fresh = regenerate(readme, demo=args.demo)
    if args.check:
        stale = stale_blocks(readme, fresh)
        for first_line in stale:
            print(f"README.md: stale output block starting {first_line!r}", file=sys.stderr)
        return 1 if stale else 0
    if args.write:
        README.write_text(keep_unchanged(readme, fresh))
        return 0
    sys.stdout.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
