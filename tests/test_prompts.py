"""Tests for tracetailor.data.prompts: formats, chat template, ids, carry, errors."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from tiny_tokenizer import tiny_tokenizer
from tracetailor.data.prompts import (
    DataError,
    Prompt,
    build_prompts,
    load_prompts,
    load_rows,
)

ROWS = [
    {"id": "a", "question": "What is 2 + 3?", "answer": "5"},
    {"id": "b", "question": "What is 12 - 7?", "answer": "5"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- formats ------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_names_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('\n{"q": "one"}\n\n  \n{"q": "two"}\n', encoding="utf-8")
    rows, where = load_rows(str(path))
    assert rows == [{"q": "one"}, {"q": "two"}]
    assert [where(0), where(1)] == [f"{path}:2", f"{path}:5"]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a\u2028b"}\n{"q": "c"}\n', encoding="utf-8")
    rows, _ = load_rows(path)
    assert rows == [{"q": "a\u2028b"}, {"q": "c"}]


def test_json_array_names_the_line_each_object_starts_on(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    rows, where = load_rows(path)
    assert rows == ROWS
    assert [where(0), where(1)] == [f"{path}:2", f"{path}:7"]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.json", ROWS)
    rows, where = load_rows(path)
    assert rows == ROWS and where(1) == f"{path}:2"


def test_json_single_object_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": ROWS}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"one JSON object \(keys: train\)"):
        load_rows(path)


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    frame = pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
            "n": [1, 2],
        },
        index=[10, 11],  # a non-default index is saved as a column; it must not show up as a field
    )
    frame.to_parquet(path)
    rows, where = load_rows(path)
    assert rows == [
        {"messages": [{"role": "user", "content": "hi"}], "n": 1},
        {"messages": [{"role": "user", "content": "yo"}], "n": 2},
    ]
    assert type(rows[0]["n"]) is int and type(rows[0]["messages"]) is list
    assert where(1) == f"{path} row 1"


def test_csv_with_bom_crlf_and_multiline_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b'\xef\xbb\xbfid,question\r\n1,"line one\r\nline two"\r\n\r\n2,plain\r\n')
    rows, where = load_rows(path)
    assert rows == [{"id": "1", "question": "line one\r\nline two"}, {"id": "2", "question": "plain"}]
    assert [where(0), where(1)] == [f"{path}:2", f"{path}:5"]


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n3,4,5\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: 3 fields, but the header has 2"):
        load_rows(path)


def test_plain_folder_with_one_data_file(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    (tmp_path / "README.md").write_text("hello")
    rows, where = load_rows(tmp_path)
    assert rows == ROWS
    assert where(0) == f"{tmp_path / 'prompts.jsonl'}:1"


def test_folder_with_no_or_several_data_files(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(DataError, match=r"no data file in this folder .*found README\.md"):
        load_rows(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.json", ROWS)
    with pytest.raises(DataError, match=r"several data files in this folder \(a\.jsonl, b\.json\)"):
        load_rows(tmp_path)


def test_saved_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "ds"))
    rows, where = load_rows(tmp_path / "ds", split="test")
    assert rows == ROWS and where(1) == f"{tmp_path / 'ds'}[test] row 1"
    with pytest.raises(DataError, match=r"no split 'train' \(splits: test\); pick one with --split"):
        load_rows(tmp_path / "ds")


class FakeDataset:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module, so the dispatch is tested where the library is absent."""
    module = types.ModuleType("datasets")
    module.calls = []
    module.load_from_disk = lambda path: module.calls.append(("disk", path)) or {"train": FakeDataset(ROWS)}

    def load_dataset(name, split):
        module.calls.append(("hub", name, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        return FakeDataset(ROWS)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_saved_datasets_folder_uses_load_from_disk(tmp_path, fake_datasets):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    rows, where = load_rows(tmp_path)
    assert rows == ROWS and fake_datasets.calls == [("disk", str(tmp_path))]
    assert where(0) == f"{tmp_path}[train] row 0"


@pytest.mark.parametrize("name", ["org/name", "gsm8k", "simplescaling/s1K-1.1"])
def test_hub_ids_go_to_load_dataset(name, fake_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows, where = load_rows(name, split="test")
    assert rows == ROWS and fake_datasets.calls == [("hub", name, "test")]
    assert where(1) == f"hub:{name}[test] row 1"


def test_hub_failure_is_explained(fake_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"hub:org/missing\[train\]: could not load .*not a local file"):
        load_rows("org/missing")


def test_missing_datasets_library_is_explained(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_rows("org/name")


@pytest.mark.parametrize("source", ["missing.jsonl", "sub/dir/missing", "./missing", "prompts.jsnl.gz"])
def test_missing_file(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^prompts file not found: {re.escape(source)}$"):
        load_rows(source)


def test_missing_file_under_an_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="prompts file not found: data/prompts"):
        load_rows("data/prompts")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_rows(path)


# --- file errors --------------------------------------------------------------


def test_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"q": "a"}\n{"q": "b"}\n{"q\xff": 1}\n')
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xff at column 4); save the file as UTF-8"


def test_not_utf8_column_counts_characters(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"q\n\xc3\xa9\xff\n")  # "é" is two bytes but one column
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(byte 0xff at column 2\)"):
        load_rows(path)


def test_bad_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a"}\n{"q": "b"}\n{"q": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON: Expecting value at column 7$"):
        load_rows(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a"}\n["q", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: expected one JSON object .* got an array$"):
        load_rows(path)


def test_bad_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"q": "a"},\n  {"q": "b"}\n  {"q": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: not valid JSON: Expecting ',' delimiter"):
        load_rows(path)


def test_json_array_element_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"q": "a"},\n\n  "b"\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: expected each array element to be a JSON object, got a string"):
        load_rows(path)


@pytest.mark.parametrize(
    "name, content",
    [("data.jsonl", ""), ("data.jsonl", "\n  \n"), ("data.json", "[]"), ("data.csv", "a,b\n")],
)
def test_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no rows$"):
        load_rows(path)


# --- building prompts ---------------------------------------------------------


def test_chat_template_ids_and_carry(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    prompts = load_prompts(path, tok, prompt_field="question", id_field="id", carry=["answer"])
    assert [p.prompt_id for p in prompts] == ["a", "b"]
    assert [p.source_row for p in prompts] == [0, 1]
    assert prompts[0].carry == {"answer": "5"}
    assert prompts[0].text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(prompts[0], Prompt)
    for p in prompts:
        assert p.token_ids == tok(p.text, add_special_tokens=False)["input_ids"]
        assert decode(tok, p.token_ids) == p.text


def test_row_numbers_are_default_ids_and_numeric_ids_are_strings(tok):
    rows = [{"prompt": "x", "n": 7}, {"prompt": "y", "n": 8}]
    assert [p.prompt_id for p in build_prompts(rows, None, tok)] == ["0", "1"]
    assert [p.prompt_id for p in build_prompts(rows, None, tok, id_field="n")] == ["7", "8"]


def test_carry_as_a_single_name(tok):
    prompts = build_prompts(ROWS, None, tok, prompt_field="question", carry="answer")
    assert prompts[1].carry == {"answer": "5"}


def test_system_prompt_and_prefill(tok):
    prompts = build_prompts(ROWS, None, tok, prompt_field="question", system_prompt="Be brief.", prefill="<think>\n")
    text = prompts[0].text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert decode(tok, prompts[0].token_ids) == text
    assert tok.convert_tokens_to_ids("<think>") in prompts[0].token_ids  # the special token, not its pieces


def test_messages_field_drops_the_reference_answer(tok):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Sys."},
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "The answer."},
            ]
        },
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]},
    ]
    first, second = build_prompts(rows, None, tok, prompt_field="messages")
    assert first.text == "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert "A1" in second.text and second.text.endswith("Q2<|im_end|>\n<|im_start|>assistant\n")
    raw = build_prompts(rows, None, tok, prompt_field="messages", chat_template=False, prefill="<think>")
    assert [p.text for p in raw] == ["Sys.\n\nQ?<think>", "Q1\n\nA1\n\nQ2<think>"]


def test_system_prompt_conflicts_with_a_system_turn(tok):
    rows = [{"messages": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q?"}]}]
    with pytest.raises(DataError, match=r"^row 0: .*already start with a system turn"):
        build_prompts(rows, None, tok, prompt_field="messages", system_prompt="Other.")


def test_no_chat_template_mode(tok):
    prompts = build_prompts(ROWS, None, tok, prompt_field="question", chat_template=False, system_prompt="Sys.", prefill="A:")
    assert prompts[0].text == "Sys.\n\nWhat is 2 + 3?A:"
    assert decode(tok, prompts[0].token_ids) == prompts[0].text
    plain = build_prompts(ROWS, None, tok, prompt_field="question", chat_template=False)
    assert plain[1].text == "What is 12 - 7?"


def test_tokenizer_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="^the student tokenizer has no chat template; pass --no-chat-template"):
        build_prompts(ROWS, None, tok, prompt_field="question")
    assert build_prompts(ROWS, None, tok, prompt_field="question", chat_template=False)[0].text == "What is 2 + 3?"


def test_template_returning_a_batch_encoding_is_handled():
    """Some transformers 5.x releases return a dict-like even with tokenize=False."""
    tok = tiny_tokenizer()
    original = tok.apply_chat_template
    tok.apply_chat_template = lambda messages, **kw: original(messages, **{**kw, "tokenize": True, "return_dict": True})
    prompt = build_prompts(ROWS, None, tok, prompt_field="question")[0]
    assert prompt.text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_template_failure_names_the_row():
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"^p.jsonl:1: the student's chat template failed on this prompt: .*roles must alternate"):
        build_prompts([{"prompt": "x"}], lambda i: f"p.jsonl:{i + 1}", tok)


# --- build errors, with the file:line they come from ---------------------------


def load_error(tmp_path, rows, tok, **kwargs) -> str:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_prompts(path, tok, **kwargs)
    return str(e.value).replace(str(path), "data.jsonl")


def test_missing_prompt_field(tmp_path, tok):
    rows = [{"question": "q"}] * 3 + [{"a": 1, "b": 2, "c": 3}]
    message = load_error(tmp_path, rows, tok, prompt_field="question")
    assert message == "data.jsonl:4: no field 'question' (fields: a, b, c); name the prompt field with --prompt-field"


def test_missing_carry_field(tmp_path, tok):
    rows = [{"question": "q", "answer": 1}, {"question": "r"}]
    message = load_error(tmp_path, rows, tok, prompt_field="question", carry=("answer",))
    assert message == "data.jsonl:2: no field 'answer' (fields: question); check the names given to --carry"


def test_missing_id_field(tmp_path, tok):
    message = load_error(tmp_path, [{"prompt": "q"}], tok, id_field="uid")
    assert message.startswith("data.jsonl:1: no field 'uid' (fields: prompt);") and "--id-field" in message


@pytest.mark.parametrize("empty", ["", "   \n", None, [], [{"role": "user", "content": " "}]])
def test_empty_prompt(tmp_path, tok, empty):
    rows = [{"question": "q"}] * 4 + [{"question": empty}]
    message = load_error(tmp_path, rows, tok, prompt_field="question")
    assert message == "data.jsonl:5: empty prompt in field 'question'; write the prompt there or remove the row"


def test_only_a_reference_answer_is_an_empty_prompt(tmp_path, tok):
    rows = [{"messages": [{"role": "assistant", "content": "A"}]}]
    assert load_error(tmp_path, rows, tok, prompt_field="messages").startswith(
        "data.jsonl:1: empty prompt in field 'messages'; ")


@pytest.mark.parametrize("bad", [3, {"role": "user"}, [{"role": "user"}], [{"role": "user", "content": 5}], ["hi"]])
def test_prompt_of_the_wrong_shape(tmp_path, tok, bad):
    message = load_error(tmp_path, [{"prompt": bad}], tok)
    assert message.startswith("data.jsonl:1: ") and "'prompt'" in message


def test_duplicate_ids(tmp_path, tok):
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, {"id": "1", "prompt": "c"}]
    message = load_error(tmp_path, rows, tok, id_field="id")
    assert message.startswith("data.jsonl:3: duplicate prompt id '1' (also at data.jsonl:1); prompt ids must be unique")
    assert "omit --id-field" in message


@pytest.mark.parametrize("bad_id", [None, "", ["x"]])
def test_unusable_id(tmp_path, tok, bad_id):
    message = load_error(tmp_path, [{"id": bad_id, "prompt": "a"}], tok, id_field="id")
    assert message.startswith("data.jsonl:1: id field 'id' holds")


def test_build_errors_name_csv_lines(tmp_path, tok):
    path = tmp_path / "data.csv"
    path.write_text('question,answer\n"two\nlines",1\n" ",2\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: empty prompt in field 'question'; "):
        load_prompts(path, tok, prompt_field="question")


def test_tiny_tokenizer_is_deterministic_and_covers_any_text():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Ünïcödé ∑ 😀 ~`|{}"
    assert decode(a, a(text, add_special_tokens=False)["input_ids"]) == text


# --- hub datasets: --subset, --revision, --streaming (load_dataset replaced; no network) ---------------------


@pytest.fixture
def load_dataset_calls(monkeypatch, tmp_path):
    """datasets.load_dataset replaced: records its arguments and serves local Parquet rows through the real
    `datasets` (an IterableDataset when streaming), counting the rows a stream hands out."""
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = tmp_path / "hub-cache" / "rows.parquet"
    data.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"question {i}", "n": i} for i in range(50)]), data)
    calls, real = [], datasets.load_dataset

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return real("parquet", data_files={kwargs["split"]: str(data)}, split=kwargs["split"],
                    streaming=kwargs.get("streaming", False), cache_dir=str(tmp_path / "hub-cache" / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    return calls


def test_subset_and_revision_reach_load_dataset(load_dataset_calls):
    from tracetailor.data.prompts import HubOptions

    rows, where = load_rows("openai/gsm8k", split="test", hub=HubOptions(subset="main", revision="e53f048"))
    assert load_dataset_calls == [("openai/gsm8k", {"split": "test", "name": "main", "revision": "e53f048"})]
    assert len(rows) == 50 and rows[3] == {"prompt": "question 3", "n": 3}
    assert where(3) == "hub:openai/gsm8k:main@e53f048[test] row 3"


def test_streaming_reads_only_the_rows_asked_for(load_dataset_calls):
    from tracetailor.data.prompts import HubOptions

    rows, where = load_rows("org/huge", split="train", hub=HubOptions(streaming=True, limit=4))
    assert load_dataset_calls == [("org/huge", {"split": "train", "streaming": True})]
    assert rows == [{"prompt": f"question {i}", "n": i} for i in range(4)]
    whole, _ = load_rows("org/huge", hub=HubOptions(streaming=True))  # no limit: the whole split, streamed
    assert len(whole) == 50


def test_generate_settings_carry_subset_revision_streaming_and_limit(load_dataset_calls):
    from tracetailor.config import GenerateConfig
    from tracetailor.sampling import load_prompt_set

    cfg = GenerateConfig(student="s", teacher="t", prompts="openai/gsm8k", subset="main", revision="v1",
                         streaming=True, limit=3, chat_template=False).validate()
    prompts = load_prompt_set(cfg, tiny_tokenizer())
    assert load_dataset_calls == [("openai/gsm8k", {"split": "train", "name": "main", "revision": "v1",
                                                    "streaming": True})]
    assert [p.text for p in prompts] == ["question 0", "question 1", "question 2"]


def test_a_missing_subset_is_named_and_hub_options_on_a_local_file_are_refused(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, **kwargs):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main', 'socratic']")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"hub:openai/gsm8k\[train\]: .*Config name is missing.\); name one with "
                                        r"--subset; it is not a local file"):
        load_rows("openai/gsm8k")
    from tracetailor.data.prompts import HubOptions

    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"p.jsonl: --subset, --streaming apply to hub datasets, and this is a local file"):
        load_rows("p.jsonl", hub=HubOptions(subset="main", streaming=True))
