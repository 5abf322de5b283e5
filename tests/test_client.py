"""The front door, kernel.client: finding the cluster, connection errors,
re-exported names, the reactor thread's life, and LocalCluster.

Anything that blocks on the reactor runs in a child process (blocking
clients cannot share a process with pytest-twisted's reactor).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from kernel import client, error, task
from kernel.testing.processes import ROOT, LocalCluster, subprocess_env


def child(code, env=None, timeout=100):
    """Run ``code`` in a fresh Python; return the CompletedProcess."""
    full_env = subprocess_env()
    full_env["TXKERNEL_PROGRESS"] = "0"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_importing_the_clients_starts_no_reactor_thread():
    out = ok(
        child(
            """
            import threading
            from kernel import client, magic, multiengineclient, taskclient
            from twisted.internet import reactor
            print(reactor.running, sorted(t.name for t in threading.enumerate()))
            """
        )
    )
    assert out.strip() == "False ['MainThread']"


def test_names_users_need_are_reexported():
    assert client.MapTask is task.MapTask
    assert client.StringTask is task.StringTask
    assert client.TaskResult is task.TaskResult
    assert client.CompositeError is error.CompositeError
    assert client.PendingResult.__module__ == "kernel.multiengineclient"
    with pytest.raises(AttributeError):
        client.NoSuchName  # noqa: B018


def test_an_unknown_adapter_is_refused_before_connecting():
    with pytest.raises(ValueError, match="unknown adapter 'zmq'"):
        client.get_multiengine_client(adapter="zmq")
    with pytest.raises(ValueError, match="unknown adapter"):
        client.TaskClient(adapter="zmq")


def test_no_running_cluster_gives_an_error_naming_the_fix(tmp_path):
    empty = tmp_path / "nocluster"
    out = ok(
        child(
            f"""
            from kernel import client
            from kernel.error import ConnectionError
            for make in (client.MultiEngineClient, client.TaskClient):
                try:
                    make(cluster_dir={str(empty)!r})
                except ConnectionError as e:
                    print("refused:", e)
            """
        )
    )
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert "txkernel cluster start" in line, line


def test_a_connection_file_others_can_read_is_refused(tmp_path):
    cd = tmp_path / "loose"
    cd.mkdir(mode=0o700)
    furl = cd / "multiengine.furl"
    furl.write_text("pb://abc@tcp:127.0.0.1:1/xyz\n")
    os.chmod(furl, 0o644)
    out = ok(
        child(
            f"""
            from kernel import client
            from kernel.error import SecurityError
            try:
                client.MultiEngineClient({str(furl)!r})
            except SecurityError as e:
                print("refused:", e)
            """
        )
    )
    assert "refused:" in out and "chmod 600" in out, out


def test_calling_a_blocking_method_on_the_reactor_thread_raises():
    out = ok(
        child(
            """
            from twisted.internet import threads
            from kernel import client, reactorthread
            from kernel.error import ClientError
            with client.LocalCluster(1) as cluster:
                mec = cluster.multiengine_client()
                def inside():
                    try:
                        mec.execute("pass")
                    except ClientError as e:
                        return str(e)
                print(reactorthread.blocking_call(inside))
            """
        )
    )
    assert "reactor thread" in out and "deadlock" in out, out


def test_local_cluster_stops_its_engines_and_the_process_exits_cleanly():
    proc = child(
        """
        import threading
        from kernel import client
        with client.LocalCluster(2) as cluster:
            mec = cluster.multiengine_client()
            assert mec.get_ids() == [0, 1]
            mec.execute("import time")
        print(cluster.controller is None,
              [t.name for t in threading.enumerate() if t.name.startswith("txkernel-engine")])
        """
    )
    assert ok(proc).strip() == "True []"
    assert proc.stderr == "", proc.stderr


def test_local_cluster_needs_at_least_one_engine():
    with pytest.raises(ValueError, match="n_engines"):
        client.LocalCluster(0)


@pytest.fixture(scope="module")
def running_cluster():
    """A cluster started with the defaults: it serves the native transport."""
    cluster = LocalCluster()
    try:
        cluster.start(n_engines=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def fc_cluster():
    """A cluster serving Foolscap (FURL connection files)."""
    cluster = LocalCluster(controller_args=["--adapter=fc"])
    try:
        cluster.start(n_engines=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_clients_find_the_cluster_with_no_arguments(running_cluster):
    """MultiEngineClient() and TaskClient() use $TXKERNEL_CLUSTER_DIR, and
    speak the transport the controller serves (native, by default)."""
    assert running_cluster.cluster_dir.served_adapter() == "native"
    out = ok(
        child(
            """
            from kernel import client
            mec = client.MultiEngineClient()
            tc = client.TaskClient()
            mec["a"] = 3
            print(mec.get_ids(), mec["a"], tc.map(abs, [-1, -2]))
            """,
            env={"TXKERNEL_CLUSTER_DIR": running_cluster.cluster_dir.path},
        )
    )
    assert out.strip() == "[0, 1] [3, 3] [1, 2]"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_clients_connect_with_a_connection_file_or_a_furl(fc_cluster):
    cd = fc_cluster.cluster_dir
    me_file = cd.file("multiengine.furl")
    task_furl = cd.read_furl("task.furl")
    out = ok(
        child(
            f"""
            from kernel import client
            mec = client.get_multiengine_client({me_file!r})
            tc = client.get_task_client({task_furl!r})
            print(len(mec.get_ids()), tc.run(client.MapTask(pow, (2, 5)), block=True).results)
            """,
            env={"TXKERNEL_CLUSTER_DIR": "/nonexistent"},
        )
    )
    assert out.strip() == "2 32"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_kill_stops_engines_and_then_the_controller(tmp_path):
    """mec.kill(targets=i) stops that engine; kill(controller=True) stops all."""
    code = f"""
        import time
        from kernel import client
        from kernel.testing.processes import LocalCluster
        cluster = LocalCluster({str(tmp_path / "cluster")!r})
        try:
            cluster.start(n_engines=2)
            mec = client.MultiEngineClient(cluster_dir=cluster.cluster_dir.path)
            first, second = mec.get_ids()
            mec.kill(targets=first)
            deadline = time.monotonic() + 30
            while mec.get_ids() != [second] and time.monotonic() < deadline:
                time.sleep(0.1)
            print("after engine kill:", mec.get_ids() == [second])
            try:
                mec.kill(controller=True)
            except Exception:
                pass  # the controller may go before it answers
            deadline = time.monotonic() + 30
            while cluster.controller.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            print("controller stopped:", not cluster.controller.alive())
        finally:
            cluster.stop()
        """
    out = ok(child(code, timeout=150))
    assert "after engine kill: True" in out, out
    assert "controller stopped: True" in out, out


def test_concurrent_first_calls_start_one_reactor_thread():
    out = ok(
        child(
            """
            import threading
            from kernel import reactorthread
            results, barrier = [], threading.Barrier(8)
            def first_call(k):
                barrier.wait()
                results.append(reactorthread.blocking_call(lambda: k * 2))
            threads = [threading.Thread(target=first_call, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            names = [t.name for t in threading.enumerate() if t.name == "txkernel-reactor"]
            print(sorted(results), len(names))
            """
        )
    )
    assert out.strip() == "[0, 2, 4, 6, 8, 10, 12, 14] 1"


def test_a_reactor_already_running_in_the_main_thread_is_used():
    """A Twisted program can call blocking clients from its worker threads."""
    out = ok(
        child(
            """
            import threading
            from twisted.internet import task, threads
            from kernel import client

            def work():
                with client.LocalCluster(1) as cluster:
                    ids = cluster.multiengine_client().get_ids()
                names = [t.name for t in threading.enumerate() if t.name == "txkernel-reactor"]
                return ids, names

            async def main(reactor):
                print(await threads.deferToThread(work))

            task.react(main)
            """
        )
    )
    assert out.strip() == "([0], [])"
