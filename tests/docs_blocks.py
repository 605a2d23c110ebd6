"""The shell blocks of README.md and docs/ marked runnable, and how a test runs one as written.

A block is runnable when the line before its opening fence is an HTML comment
(invisible on GitHub):

    <!-- runnable -->                               run every line
    <!-- runnable: lines=2 -->                      only these lines (1-based, comma-separated)
    <!-- runnable: append="--config.num_samples=8" -->  these flags appended to each command
    <!-- runnable: append2="..." -->                 ... to the second command only
    <!-- runnable: free_port=localhost:12355 -->    that address replaced by a free port
    <!-- runnable: id=quickstart by=test_digits.py --> run by that test (`run_block("quickstart", ...)`),
                                                    which checks what the command wrote
    <!-- runnable: files=DDIM20_router.pt:routers/DDIM20_router.pt -->
                                                    the file a command reads, as a link to that
                                                    reference fixture (../shared/fixtures) under the
                                                    documented name (comma-separated pairs)
    <!-- runnable: expect=1 -->                     each `# ...` comment line right after a command
                                                    is output the command must print

`append` holds what makes a documented command the smallest run that still
exercises it (fewer samples or steps); nothing else of the line changes. A
line's setup prefix (`python3 -m venv .venv && .venv/bin/pip install ... &&`)
is dropped: the tests run inside that environment already. Blocks run with
bash in a fresh directory holding links to scripts/, configs/ and convert/,
with this environment's bin directory (`python`, the console commands) first
on PATH.
"""

import glob
import os
import re
import subprocess
import sys

from conftest import ROOT, fixture_path

MARK = re.compile(r"^<!--\s*runnable(?::\s*(?P<opts>.*?))?\s*-->\s*$")
SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]*&& ")
COMMAND = re.compile(r"(python\S* (scripts|convert)/\S+\.py|(\.venv/bin/)?l2c-[a-z-]+)")


def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _options(text):
    opts = {}
    for m in re.finditer(r"(\w+)=((?:\"[^\"]*\")|\S+)", text or ""):
        opts[m.group(1)] = m.group(2).strip('"')
    return opts


def runnable_blocks(path):
    """[(name, [lines], options)] of the blocks marked runnable in one markdown file."""
    lines = open(path, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = MARK.match(lines[i].strip())
        if m and i + 1 < len(lines) and lines[i + 1].startswith("```"):
            j = i + 2
            while not lines[j].startswith("```"):
                j += 1
            name = f"{os.path.relpath(path, ROOT)}:{i + 2}"
            blocks.append((name, lines[i + 2:j], _options(m.group("opts"))))
            i = j
        i += 1
    return blocks


def _join_continuations(lines):
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    return [line for line in out if line.strip() and not line.lstrip().startswith("#")]


def script_of(lines, opts):
    """The bash text a block runs: continuations joined, setup dropped, `append` added to each command."""
    commands = _join_continuations(lines)
    if "lines" in opts:
        keep = [int(n) for n in opts["lines"].split(",")]
        commands = [commands[n - 1] for n in keep]
    out = []
    for n, c in enumerate(commands, 1):
        c = re.sub(r"\s+#\s.*$", "", c)  # a trailing shell comment (none of the blocks quote a " #")
        c = SETUP.sub("", c.strip()).replace(".venv/bin/", "")
        # `wait` alone returns 0 whatever the background jobs did: wait for each and fail with it
        c = re.sub(r";\s*wait$", "; for j in $(jobs -p); do wait $j; done", c)
        extra = " ".join(opts[k] for k in ("append", f"append{n}") if k in opts)
        if extra and COMMAND.search(c):
            # after the command's own arguments, before a trailing `&` / `& done ...` of a loop
            c = re.sub(r"(\s*(&\s*done.*|&)?)$", lambda m: " " + extra + m.group(1), c, count=1)
        out.append(c)
    return "\n".join(out)


def all_blocks():
    return [b for doc in documents() for b in runnable_blocks(doc)]


def block(block_id):
    """The block marked `id=block_id`."""
    found = [b for b in all_blocks() if b[2].get("id") == block_id]
    assert len(found) == 1, f"{len(found)} blocks marked id={block_id}"
    return found[0]


def expected_output(lines):
    """The `# ...` comment lines that directly follow a command: what the documentation says it prints."""
    out, after_command = [], False
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            if after_command:
                out.append(text.lstrip("#").strip())
        else:
            after_command = bool(text) and not text.endswith("\\")
    return out


def run(name, lines, opts, cwd, append="", timeout=None):
    """Runs one block as written (plus its own `append` and the caller's) in `cwd`; returns the process.

    `append`: flags added to every command, or {n: flags} for the n-th command (1-based)."""
    for d in ("scripts", "configs", "convert"):
        if not os.path.exists(os.path.join(cwd, d)):
            os.symlink(os.path.join(ROOT, d), os.path.join(cwd, d))
    for pair in filter(None, opts.get("files", "").split(",")):
        dest, src = pair.split(":")
        os.makedirs(os.path.dirname(os.path.join(cwd, dest)) or cwd, exist_ok=True)
        os.symlink(fixture_path(*src.split("/")), os.path.join(cwd, dest))
    # This environment's bin first: its `python` (a link elsewhere would lose the venv) and console commands.
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    # the caller's flags: one string for every command, or {n: flags} for the n-th (1-based)
    for key, extra in ((append.items() if isinstance(append, dict) else [("", append)])):
        if extra:
            k = f"append{key}"
            opts = dict(opts, **{k: " ".join(x for x in (opts.get(k, ""), extra) if x)})
    script = "set -euo pipefail\n" + script_of(lines, opts)
    if "free_port" in opts:
        from multiprocess import free_port
        script = script.replace(opts["free_port"], f"localhost:{free_port()}")
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout or int(opts.get("timeout", 600)))
    assert r.returncode == 0, f"{name} failed:\n{script}\n--- stderr\n{r.stderr[-3000:]}"
    if opts.get("expect"):
        for text in expected_output(lines):
            assert text in r.stdout + r.stderr, f"{name}: the documented output {text!r} is not printed:\n{r.stdout}"
    return r


def run_block(block_id, cwd, append="", timeout=None):
    """The block marked `id=block_id`, run as written in `cwd` with `append` added to its commands."""
    return run(*block(block_id), str(cwd), append=append, timeout=timeout)
