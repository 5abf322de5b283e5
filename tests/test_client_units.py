"""Unit tests of the client-side pieces that need no reactor: PendingResult,
ResultList and QueueStatusList printing, with-block source extraction,
argument checking, the %autopx transformer and streamed-output printing;
and verifyObject for every client implementation."""

import contextlib
import io

import pytest
from zope.interface.verify import verifyObject

from kernel.error import CompositeError, InvalidDeferredID, RemoteError, ResultNotCompleted
from kernel.interfaces import IMapper, IParallelFunction, IPendingResult
from kernel.magic import ParallelMagics, _print_output, _StreamPrinter
from kernel.multiengineclient import (
    BlockingMultiEngineMapper,
    FullBlockingMultiEngineClient,
    IFullBlockingMultiEngineClient,
    PendingResult,
    QueueStatusList,
    ResultList,
    StopLocalExecution,
    remote,
    strip_whitespace,
    wrapResultList,
)
from kernel.taskclient import BlockingTaskClient, BlockingTaskMapper, IBlockingTaskClient


class FakeClient:
    """Answers _getPendingResult from a script of outcomes."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    def _getPendingResult(self, result_id, block):  # noqa: N802 - the seed's protocol
        self.calls.append((result_id, block))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


# -- PendingResult -------------------------------------------------------------


def test_pending_result_provides_its_interface():
    # verifyObject reads the ``r`` attribute, which fetches the result
    verifyObject(IPendingResult, PendingResult(FakeClient("ready"), 1))


def test_get_result_returns_default_while_not_ready_then_the_value():
    client = FakeClient(ResultNotCompleted("not yet"), [1, 2])
    pr = PendingResult(client, 7)
    assert pr.get_result(default="wait", block=False) == "wait"
    assert pr.get_result() == [1, 2]
    assert client.calls == [(7, False), (7, True)]


def test_a_fetched_result_is_kept_and_not_asked_for_again():
    client = FakeClient("value")
    pr = PendingResult(client, 1)
    assert pr.r == "value"
    assert pr.get_result(block=False) == "value"
    assert len(client.calls) == 1


def test_an_exception_is_raised_on_every_later_get():
    err = CompositeError("boom", [RemoteError("ValueError", "bad", engine_id=0)])
    pr = PendingResult(FakeClient(err), 1)
    for _ in range(3):
        with pytest.raises(CompositeError) as info:
            pr.get_result()
        assert info.value is err


def test_callbacks_chain_with_their_arguments():
    pr = PendingResult(FakeClient([1, 2, 3]), 1)
    pr.add_callback(lambda r, k, offset=0: [x * k + offset for x in r], 10, offset=1)
    pr.add_callback(sum)
    assert pr.r == 63


def test_a_callback_added_after_the_result_applies_at_once():
    pr = PendingResult(FakeClient(5), 1)
    assert pr.r == 5
    pr.add_callback(lambda r: r + 1)
    assert pr.r == 6


def test_a_failing_callback_makes_get_result_raise_each_time():
    pr = PendingResult(FakeClient(0), 1)
    pr.add_callback(lambda r: 1 / r)
    with pytest.raises(ZeroDivisionError):
        pr.get_result()
    with pytest.raises(ZeroDivisionError):
        _ = pr.r


def test_an_invalid_id_is_an_error_not_a_default():
    pr = PendingResult(FakeClient(InvalidDeferredID("gone")), 1)
    with pytest.raises(InvalidDeferredID):
        pr.get_result(default="x", block=False)


def test_pending_result_repr_says_its_state():
    pr = PendingResult(FakeClient(1), 4)
    assert "id=4 pending" in repr(pr)
    _ = pr.r
    assert "ready" in repr(pr)


# -- printing ----------------------------------------------------------------


def test_result_list_prints_each_engine_input_and_output():
    r = ResultList(
        [
            {"id": 0, "number": 3, "input": "print(1)\nx = 2", "stdout": "1\n", "stderr": ""},
            {"id": 1, "number": 3, "input": "print(1)\nx = 2", "stdout": "", "stderr": "warn\n"},
        ]
    )
    text = repr(r)
    assert text.splitlines()[0] == "<Results List>"
    assert "[0] In [3]: print(1)" in text
    assert "            x = 2" in text  # continuation lines aligned under the input
    assert "[0] Out[3]: 1" in text
    assert "[1] Err[3]: warn" in text
    assert "[1] Out[3]" not in text
    assert str(r) == text


def test_wrap_result_list_wraps_lists_only():
    assert isinstance(wrapResultList([{"id": 0}]), ResultList)
    assert wrapResultList(None) is None


def test_queue_status_list_prints_each_engine():
    q = QueueStatusList(
        [(0, {"pending": "execute('x')", "queue": ["push(a)", "pull(b)"]}), (1, {"queue": []})]
    )
    text = repr(q)
    assert "[0]   running: execute('x')" in text
    assert "[0]   waiting: 2 command(s)" in text
    assert "[0]     pull(b)" in text
    assert "[1]   running: nothing" in text


# -- with-blocks ------------------------------------------------------------


def test_remote_stops_the_local_run():
    with pytest.raises(StopLocalExecution):
        remote()


def test_strip_whitespace_keeps_the_block_after_remote():
    body = [
        "    remote()\n",
        "    a = 1\n",
        "    if a:\n",
        "        b = 2\n",
        "    # a comment\n",
        "after = 3\n",
    ]
    assert strip_whitespace(body) == "a = 1\nif a:\n    b = 2\n# a comment\n"


def test_strip_whitespace_needs_remote_first():
    with pytest.raises(ValueError, match="remote()"):
        strip_whitespace(["    a = 1\n"])


def test_the_with_block_source_is_found_in_a_file():
    sent = []

    class Recorder(FullBlockingMultiEngineClient):
        def execute(self, lines, targets=None, block=None):
            sent.append(lines)
            return "result"

    mec = Recorder(None)
    with mec as result:
        remote()
        on_engines = 1  # noqa: F841

    assert result == "result"
    assert sent == ["on_engines = 1  # noqa: F841\n"]
    assert "on_engines" not in locals()


# -- argument checking ---------------------------------------------------------


@pytest.mark.parametrize("targets", [0, [1, 2], (3,), range(2), "all"])
def test_valid_targets_are_accepted(targets):
    mec = FullBlockingMultiEngineClient(None)
    mec.targets = targets
    assert mec.targets == (list(targets) if not isinstance(targets, (int, str)) else targets)


@pytest.mark.parametrize("targets", ["some", [], [1, "2"], True, 1.5, None])
def test_invalid_targets_are_refused_naming_the_choices(targets):
    mec = FullBlockingMultiEngineClient(None)
    with pytest.raises(TypeError, match="engine id"):
        mec.targets = targets


def test_block_must_be_a_bool():
    mec = FullBlockingMultiEngineClient(None)
    with pytest.raises(TypeError):
        mec.block = 1
    with pytest.raises(TypeError):
        mec.execute("pass", block="no")


def test_mapper_refuses_an_unknown_distribution():
    with pytest.raises(Exception, match="'z'"):
        FullBlockingMultiEngineClient(None).mapper(dist="z")


def test_the_mapper_calls_raw_map_with_its_settings():
    calls = []

    class Recorder(FullBlockingMultiEngineClient):
        def raw_map(self, func, seq, dist="b", targets=None, block=None):
            calls.append((func, seq, dist, targets, block))
            return "mapped"

    mec = Recorder(None)
    assert mec.mapper(targets=[1], block=False).map(abs, [1], [2]) == "mapped"
    assert calls == [(abs, ([1], [2]), "b", [1], False)]


# -- interfaces ----------------------------------------------------------------


def test_client_classes_provide_their_interfaces():
    mec = FullBlockingMultiEngineClient(None)
    verifyObject(IFullBlockingMultiEngineClient, mec)
    verifyObject(IMapper, BlockingMultiEngineMapper(mec, "b", None, None))
    verifyObject(IParallelFunction, mec.parallel()(abs))
    tc = BlockingTaskClient(None)
    verifyObject(IBlockingTaskClient, tc)
    verifyObject(IMapper, BlockingTaskMapper(tc))
    verifyObject(IParallelFunction, tc.parallel()(abs))


# -- magics helpers ------------------------------------------------------------


class FakeShell:
    def __init__(self):
        self.input_transformers_cleanup = []


def test_autopx_transformer_sends_whole_cells_and_lets_its_own_magics_through():
    magics = ParallelMagics.__new__(ParallelMagics)
    magics.autopx_on = True
    cell = ["x = 1\n", "for i in range(2):\n", "    x += i\n"]
    (line,) = magics._transform(cell)
    assert line == f"get_ipython().run_cell_magic('px', '', {''.join(cell)!r})\n"
    assert magics._transform(["%autopx\n"]) == ["%autopx\n"]
    assert magics._transform(["%result 2\n"]) == ["%result 2\n"]
    magics.autopx_on = False
    assert magics._transform(cell) == cell


def test_stream_printer_labels_whole_lines_even_when_engines_interleave(capsys):
    printer = _StreamPrinter()
    printer(0, "stdout", "engine")
    printer(1, "stdout", "engine 1\n")
    printer(0, "stdout", " 0\nsecond")
    printer(1, "stderr", "oops\n")
    printer.finish()
    captured = capsys.readouterr()
    assert captured.out == "[stdout:1] engine 1\n[stdout:0] engine 0\n[stdout:0] second\n"
    assert captured.err == "[stderr:1] oops\n"


def test_print_output_labels_each_line(capsys):
    _print_output([{"id": 2, "stdout": "a\nb\n", "stderr": ""}])
    assert capsys.readouterr().out == "[stdout:2] a\n[stdout:2] b\n"


def test_stream_printer_is_safe_to_finish_twice(capsys):
    printer = _StreamPrinter()
    printer(0, "stdout", "partial")
    printer.finish()
    printer.finish()
    assert capsys.readouterr().out == "[stdout:0] partial\n"


def test_stream_printer_writes_to_the_current_stdout():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        p = _StreamPrinter()
        p(0, "stdout", "x\n")
    assert buf.getvalue() == "[stdout:0] x\n"
