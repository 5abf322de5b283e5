"""The in-memory task database, and the query helpers every backend shares."""

import pytest

from kernel.taskdb import RECORD_KEYS, match, new_record, project
from kernel.taskdb.memory import DictDB
from tests.contract.taskdb import TaskDBContract


class TestDictDB(TaskDBContract):
    @pytest.fixture
    def db(self):
        return DictDB()


def test_new_record_has_every_key():
    rec = new_record(3, status="pending")
    assert set(rec) == set(RECORD_KEYS) and rec["taskid"] == 3 and rec["engine_id"] is None


def test_new_record_refuses_unknown_keys():
    with pytest.raises(KeyError, match="colour"):
        new_record(1, colour="red")


def test_match_comparison_with_none_is_false_not_an_error():
    assert not match({"started": None}, {"started": {"$gt": 1.0}})
    assert match({"started": None}, {"started": {"$ne": 1.0}})


def test_match_comparison_of_mismatched_types_is_false():
    assert not match({"status": "x"}, {"status": {"$gt": 1}})


def test_match_plain_dict_value_is_compared_exactly():
    rec = {"error": {"ename": "E"}}
    assert match(rec, {"error": {"ename": "E"}})
    assert not match(rec, {"error": {"ename": "F"}})


def test_project_with_single_key_string():
    assert project({"taskid": 1, "status": "failed"}, "status") == {"taskid": 1, "status": "failed"}
