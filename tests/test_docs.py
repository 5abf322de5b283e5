"""The user guide (docs/): links resolve, code compiles, and the guide's
IPython sessions run as written against a real four-engine cluster."""

import json
import os
import re
import subprocess
import sys

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from kernel.testing.processes import ROOT, LocalCluster, subprocess_env
from tests import docs_runner

DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))
RUNNABLE = [p for p in PAGES if docs_runner.blocks(os.path.join(DOCS, p))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    return LINK.findall(text)


@pytest.mark.parametrize("page", [*PAGES, "../README.md"])
def test_links_resolve(page):
    """Every relative link names an existing file (and heading, if it has an anchor)."""
    path = os.path.normpath(os.path.join(DOCS, page))
    for target in links(path):
        if re.match(r"[a-z]+:", target):
            continue  # an external URL
        file_part, _, anchor = target.partition("#")
        dest = (
            os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        )
        assert os.path.exists(dest), f"{page}: broken link {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page}: no heading for #{anchor} in {target}"


def test_index_links_every_page():
    linked = {t.partition("#")[0] for t in links(os.path.join(DOCS, "index.md"))}
    assert set(PAGES) - {"index.md"} <= linked


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_compile(page):
    """Python and IPython blocks are valid code (after IPython's magic syntax)."""
    path = os.path.join(DOCS, page)
    for block in docs_runner.blocks(path, ("python", "ipython")):
        compile(TransformerManager().transform_cell(block), page, "exec")


def test_the_guide_has_sessions_to_run():
    assert {"quickstart.md", "multiengine.md", "tasks.md", "magics.md"} <= set(RUNNABLE)


@pytest.fixture(scope="module")
def guide_outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guide")
    cluster = LocalCluster(str(tmp / "cluster"))
    try:
        cluster.start(n_engines=4)
        out = tmp / "outcomes.json"
        pages = [os.path.join(DOCS, p) for p in RUNNABLE]
        env = subprocess_env()
        env["TXKERNEL_PROGRESS"] = "0"
        proc = subprocess.run(
            [sys.executable, "-m", "tests.docs_runner", cluster.cluster_dir.path, str(out), *pages],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if not out.exists():
            raise RuntimeError(f"the docs runner did not report:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(out.read_text())
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", RUNNABLE)
def test_guide_sessions_run_as_written(page, guide_outcomes):
    assert page in guide_outcomes, f"{page} did not run"
    assert guide_outcomes[page] is None, guide_outcomes[page]


def test_guide_builds_with_sphinx_without_warnings(tmp_path):
    """``sphinx-build -W`` (warnings are errors) renders the whole guide."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            DOCS,
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "html" / "tasks.html").exists()
