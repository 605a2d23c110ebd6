"""The documentation runs: every shell block marked runnable in README.md and docs/ runs as written.

Blocks marked `by=FILE` are run by that test (which also checks what they wrote); the rest run
here. The marks and how a block runs: tests/docs_blocks.py.
"""

import os

import pytest

from conftest import ROOT
from docs_blocks import MARK, all_blocks, documents, expected_output, run, script_of

ALL = all_blocks()
HERE = [b for b in ALL if "by" not in b[2]]


def test_blocks_are_marked_every_mark_opens_a_block_and_every_by_runs_its_block():
    assert len(ALL) >= 5
    for doc in documents():
        lines = open(doc, encoding="utf-8").read().split("\n")
        for i, line in enumerate(lines):
            if MARK.match(line.strip()):
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{doc}:{i + 1}: mark without a block"
    for name, _, opts in ALL:
        if "by" in opts:
            path = os.path.join(ROOT, "tests", opts["by"])
            assert os.path.isfile(path) and f'run_block("{opts.get("id")}"' in open(path).read(), name


def test_the_script_is_the_documented_command_plus_its_append():
    lines = ["python3 -m venv .venv && .venv/bin/pip install -e '.[digits]' && .venv/bin/l2c-sample --config c.py",
             "python scripts/x.py --a 1 \\", "    --b 2   # comment", "# a comment line"]
    assert script_of(lines, {"append": "--n=2"}) == "l2c-sample --config c.py --n=2\npython scripts/x.py --a 1      --b 2 --n=2"
    assert script_of(lines, {"lines": "1"}) == "l2c-sample --config c.py"
    assert script_of(lines, {"append2": "--n=2"}).endswith("--b 2 --n=2")
    loop = ["for i in 0 1; do l2c-sample --config c.py --id $i & done; wait"]
    assert script_of(loop, {"append": "--n=2"}) == \
        "for i in 0 1; do l2c-sample --config c.py --id $i --n=2 & done; for j in $(jobs -p); do wait $j; done"


def test_documented_output_is_the_comments_right_after_a_command():
    lines = ["# before any command", "python a.py", "# prints X", "python b.py \\", "    --c", "# Y", "# Z", "",
             "# after a blank line"]
    assert expected_output(lines) == ["prints X", "Y", "Z"]
    assert any(opts.get("expect") for _, _, opts in ALL)  # at least one block's output is checked


@pytest.mark.slow
@pytest.mark.parametrize("name,lines,opts", HERE, ids=[b[0] for b in HERE])
def test_runnable_block_runs(name, lines, opts, tmp_path):
    run(name, lines, opts, str(tmp_path))
