"""Run the user guide's ``ipython`` code blocks, as a reader would type them.

Started by :mod:`tests.test_docs` as a child process (the blocking clients
need their own reactor thread)::

    python -m tests.docs_runner CLUSTER_DIR OUT.json docs/quickstart.md ...

For each page, in a fresh IPython ``InteractiveShell`` with
``$TXKERNEL_CLUSTER_DIR`` set to the running cluster, every block marked
``ipython`` runs in order. A block must succeed, unless its first line is a
``# raises`` comment, in which case it must fail. The outcome per page (None,
or what went wrong with the block's output) goes to ``OUT.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import traceback

BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(path: str, languages: tuple[str, ...] = ("ipython",)) -> list[str]:
    """The code blocks of a Markdown file in ``languages``, in order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [m.group(2) for m in BLOCK.finditer(text) if m.group(1) in languages]


def run_page(path: str) -> str | None:
    """Run a page's blocks in a fresh shell; None if all behaved."""
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    for i, block in enumerate(blocks(path), 1):
        expect_error = block.lstrip().startswith("# raises")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            result = shell.run_cell(block, store_history=True)
        failed = not result.success
        if failed != expect_error:
            what = "should have failed" if expect_error else "failed"
            return f"block {i} {what}:\n{block}\n--- output ---\n{out.getvalue()}"
    return None


def reset_cluster() -> None:
    """Empty namespaces, properties and tasks between pages."""
    from kernel import client

    mec = client.MultiEngineClient()
    mec.reset()
    mec.clear_properties()
    client.TaskClient().clear()


def main(argv: list[str]) -> int:
    cluster_dir, out_path, *pages = argv
    os.environ["TXKERNEL_CLUSTER_DIR"] = cluster_dir
    outcomes: dict[str, str | None] = {}
    try:
        for page in pages:
            try:
                reset_cluster()
                outcomes[os.path.basename(page)] = run_page(page)
            except BaseException:
                outcomes[os.path.basename(page)] = traceback.format_exc()
    finally:
        with open(out_path, "w") as f:
            json.dump(outcomes, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
