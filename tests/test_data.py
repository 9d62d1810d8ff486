"""Records, validation and templates (dopd.data), and the answer checker."""

import json

import pytest

from dopd.data import DataError, PromptTemplate, Record, load_records, write_records
from dopd.evaluate import exact_match, extract_answer
from dopd.tasks.chain import all_problems, make_problems
from dopd.tasks.tokenizer import build_char_tokenizer


def test_load_jsonl_json_and_list(tmp_path):
    rows = [{"prompt": "1+1", "privileged": "hint", "answer": "2"}, {"prompt": "2+2", "privileged": ""}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    expected = [Record("1+1", "hint", "2"), Record("2+2", "", None)]
    assert load_records(str(jl)) == expected
    assert load_records(str(js)) == expected
    assert load_records(rows) == expected


def test_load_dataset_like_object():
    class FakeDataset:  # the part of datasets.Dataset the loader relies on
        column_names = ["prompt", "privileged"]

        def __iter__(self):
            return iter([{"prompt": "p", "privileged": "h"}])

    assert load_records(FakeDataset()) == [Record("p", "h")]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"privileged": "h"}], "missing field"),
        ([{"prompt": "p"}], "missing field"),
        ([{"prompt": "   ", "privileged": "h"}], "empty prompt"),
        ([{"prompt": 3, "privileged": "h"}], "must be a string"),
        ([], "no records"),
        (["not a dict"], "expected an object"),
    ],
)
def test_bad_records(rows, message):
    with pytest.raises(DataError, match=message):
        load_records(rows)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "privileged": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_records(str(bad))


def test_eval_records_need_no_hint():
    assert load_records([{"prompt": "p", "answer": "1"}], require_privileged=False) == [Record("p", "", "1")]


def test_write_then_load_roundtrip(tmp_path):
    recs = [p.record() for p in make_problems(5, seed=0)]
    write_records(recs, str(tmp_path / "x.jsonl"))
    assert [r.__dict__ for r in load_records(str(tmp_path / "x.jsonl"))] == recs


def test_templates_plain_and_chat():
    tok = build_char_tokenizer()
    rec = Record("q: 1+2", "hint: 3")
    tpl = PromptTemplate()
    assert tpl.render(tok, rec, privileged=False) == "q: 1+2\n"
    assert tpl.render(tok, rec, privileged=True) == "q: 1+2\n\nhint: 3\n"
    custom = PromptTemplate(privileged_template="{privileged}; {prompt}", response_prefix="")
    assert custom.render(tok, rec, privileged=True) == "hint: 3; q: 1+2"
    # A chat template is applied to both contexts, the same way: only the hint differs.
    tok.chat_template = "{% for m in messages %}u:{{ m['content'] }};{% endfor %}a:"
    assert tpl.render(tok, rec, privileged=False) == "u:q: 1+2;a:"
    assert tpl.render(tok, rec, privileged=True) == "u:q: 1+2\n\nhint: 3;a:"
    assert tpl.encode(tok, [rec], privileged=False)[0] == tok("u:q: 1+2;a:")["input_ids"]


@pytest.mark.parametrize("kwargs", [{"student_template": "{prompt} {privileged}"}, {"student_template": "x"},
                                    {"privileged_template": "{prompt} {other}"}])
def test_bad_templates(kwargs):
    with pytest.raises(DataError):
        PromptTemplate(**kwargs)


def test_answer_checker():
    assert extract_answer("3+4=7 #### 7") == "7"
    assert extract_answer("so \\boxed{42} done") == "42"
    assert extract_answer("first 3 then 1,234.") == "1,234"
    assert extract_answer("no answer") is None
    assert exact_match("#### 1,234.", "1234")
    assert not exact_match("3+4=7 #### 8", "7")


def test_task_hint_never_holds_the_answer_step():
    for p in all_problems():
        assert p.solution() == p.solution(hinted=True) == " ".join(p.steps()) + f" #### {p.answer}"
        assert p.privileged == "hint: " + " ".join(p.steps()[:-1])  # all steps but the one with the answer
        assert int(p.steps()[-1][-1]) == int(p.answer) == (p.start + p.addend * p.num_steps) % 10
