"""The blocking client and the magics inside a real Jupyter kernel (ipykernel):
the reactor thread lives beside the kernel's own event loop, results display,
engine output reaches the cell, and %autopx works."""

import jupyter_client  # with ipykernel, from the `test` extra
import pytest

from kernel.testing.processes import ROOT, subprocess_env

TIMEOUT = 60


@pytest.fixture
def kernel_client():
    env = subprocess_env()
    env["TXKERNEL_PROGRESS"] = "0"
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=ROOT)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code):
    """Execute a cell; return (reply status, text streamed, results shown)."""
    streams, results = [], []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            streams.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            results.append(content["data"].get("text/plain", ""))
        elif kind == "error":
            streams.append("\n".join(content["traceback"]))

    reply = kc.execute_interactive(code, output_hook=hook, timeout=TIMEOUT)
    return reply["content"]["status"], "".join(streams), results


def test_clients_and_magics_work_in_a_jupyter_kernel(kernel_client):
    kc = kernel_client
    status, out, _ = run(
        kc,
        "from kernel import client\n"
        "cluster = client.LocalCluster(2)\n"
        "mec = cluster.multiengine_client()\n"
        "mec.activate()",
    )
    assert status == "ok", out

    status, out, _ = run(kc, "%px print('hello from', id)")
    assert status == "ok", out
    assert "[stdout:0] hello from 0" in out and "[stdout:1] hello from 1" in out, out

    status, out, results = run(kc, "mec.map(abs, [-1, -2, -3])")
    assert status == "ok", out
    assert results == ["[1, 2, 3]"]

    assert run(kc, "%autopx")[0] == "ok"
    status, out, _ = run(kc, "q = 5\nfor i in range(2):\n    print('loop', i)")
    assert status == "ok", out
    assert "[stdout:0] loop 1" in out, out
    assert run(kc, "%autopx")[0] == "ok"
    status, out, results = run(kc, "'q' in dir(), mec['q']")
    assert results == ["(False, [5, 5])"], (out, results)

    status, out, _ = run(kc, "%px 1 / (id - 1)")
    assert status == "error"
    assert "[engine 1] ZeroDivisionError" in out, out

    status, out, _ = run(kc, "cluster.stop()")
    assert status == "ok", out
