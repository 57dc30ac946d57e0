"""Reading records from the files users have, validating them with errors that name file, line
(or row) and field, and turning examples into deterministic batches."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from alignloop.data.batching import ShuffledBatches, collate, pack_shared_sides, split_holdout
from alignloop.data.load import load_records, read_rows
from alignloop.data.records import KIND_FIELDS, Row, detect_kind
from alignloop.data.tokenize import Example
from alignloop.errors import DataError

ALL_KINDS = tuple(KIND_FIELDS)
SFT_KINDS = ("prompt_completion", "chat")

PROMPT_COMPLETION = [
    {"prompt": "What is 2+2?", "completion": " 4."},
    {"prompt": "Name a colour.", "completion": " Blue, \"quoted\", with a comma."},
    {"prompt": "Say hi.", "completion": " Hi!"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


# --- writers for every supported format ----------------------------------------------------------
def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    # Chat fields go into a cell as JSON text, as users export them from spreadsheets.
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()})
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_saved_dataset(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.fixture
def writers(write_jsonl):
    return {
        "jsonl": lambda folder, records: write_jsonl(folder / "data.jsonl", records),
        "json": lambda folder, records: write_json(folder / "data.json", records),
        "csv": lambda folder, records: write_csv(folder / "data.csv", records),
        "parquet": lambda folder, records: write_parquet(folder / "data.parquet", records),
        "datasets": lambda folder, records: write_saved_dataset(folder / "data_ds", records),
    }


FORMATS = ["jsonl", "json", "csv", "parquet", "datasets"]


# --- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("records", "kind"), [(PROMPT_COMPLETION, "prompt_completion"), (CHAT, "chat")])
def test_every_format_yields_the_same_records(tmp_path, writers, fmt, records, kind):
    path = writers[fmt](tmp_path, records)

    rows, detected = load_records(str(path), SFT_KINDS)

    assert detected == kind
    assert [row.fields for row in rows] == records


def test_json_accepts_a_data_wrapper(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": PROMPT_COMPLETION}))
    rows, _ = load_records(str(path), SFT_KINDS)
    assert [row.fields for row in rows] == PROMPT_COMPLETION


def test_saved_dataset_dict_uses_its_train_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PROMPT_COMPLETION), "test": datasets.Dataset.from_list(PROMPT_COMPLETION[:1])}
    ).save_to_disk(str(folder))
    rows, _ = load_records(str(folder), SFT_KINDS)
    assert [row.fields for row in rows] == PROMPT_COMPLETION


def test_saved_dataset_dict_without_train_split_names_the_splits(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(PROMPT_COMPLETION)}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"without a 'train' split \(splits: validation\)"):
        read_rows(str(folder))


def test_folder_that_is_not_a_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: a folder, but not a dataset")):
        read_rows(str(tmp_path))


def test_text_file_is_one_text_record(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Once upon a time.\nThe end.\n")
    rows, kind = load_records(str(path), ("text",))
    assert kind == "text"
    assert [row.fields for row in rows] == [{"text": "Once upon a time.\nThe end.\n"}]


def test_glob_reads_every_matching_file_in_order(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "b.jsonl", PROMPT_COMPLETION[1:])
    write_jsonl(tmp_path / "a.jsonl", PROMPT_COMPLETION[:1])
    rows, _ = load_records(str(tmp_path / "*.jsonl"), SFT_KINDS)
    assert [row.fields for row in rows] == PROMPT_COMPLETION
    assert rows[0].where == f"{tmp_path / 'a.jsonl'}:1"


def test_glob_matching_nothing_is_named(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{pattern}: no file matches")):
        read_rows(pattern)


def test_max_samples_keeps_the_first_records(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "data.jsonl", PROMPT_COMPLETION)
    rows, _ = load_records(str(path), SFT_KINDS, max_samples=2)
    assert [row.fields for row in rows] == PROMPT_COMPLETION[:2]


def test_blank_lines_in_jsonl_are_skipped_and_lines_keep_their_numbers(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "gaps.jsonl", [PROMPT_COMPLETION[0], "", PROMPT_COMPLETION[1]])
    rows, _ = load_records(str(path), SFT_KINDS)
    assert [row.where for row in rows] == [f"{path}:1", f"{path}:3"]


# --- kinds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"text": "raw text"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"messages": [{"role": "user", "content": "u"}]}, "chat"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"prompt": "p", "completion": "c", "label": True}, "binary"),
        ({"prompt": "p", "completion": "c", "rating": 4}, "rating"),
        ({"prompt": "p", "answer": "42"}, "prompt"),
        ({"text": "t", "label": "joy"}, "labelled"),
        ({"text": "t", "shown": "joy", "propensity": 0.9, "reward": 0, "label": "anger"}, "bandit"),
        ({"tokens": ["a", "b"], "start": 0, "end": 1, "shown": "PER", "propensity": 0.8, "reward": 1}, "bandit"),
    ],
)
def test_kind_is_detected_from_trl_field_names(fields, kind):
    assert detect_kind(Row(fields, "x.jsonl:1"), ALL_KINDS) == kind


def test_kind_detection_is_limited_to_what_the_stage_accepts():
    thumbs = Row({"prompt": "p", "completion": "c", "label": True}, "x.jsonl:1")
    assert detect_kind(thumbs, ALL_KINDS) == "binary"
    assert detect_kind(thumbs, SFT_KINDS) == "prompt_completion"


def test_record_of_no_accepted_kind_names_needed_and_found_fields():
    with pytest.raises(DataError) as e:
        detect_kind(Row({"question": "q", "answer": "a"}, "x.jsonl:4"), SFT_KINDS)
    message = str(e.value)
    assert message.startswith("x.jsonl:4: ")
    assert "{prompt, completion}" in message and "{messages}" in message
    assert "found fields: answer, question" in message


def test_csv_labels_and_ratings_become_bool_and_float(tmp_path):
    binary = write_csv(tmp_path / "thumbs.csv", [{"prompt": "p", "completion": "c", "label": v} for v in ("true", "0")])
    rows, kind = load_records(str(binary), ALL_KINDS)
    assert kind == "binary"
    assert [row.fields["label"] for row in rows] == [True, False]

    rating = write_csv(tmp_path / "ratings.csv", [{"prompt": "p", "completion": "c", "rating": "4.5"}])
    rows, kind = load_records(str(rating), ALL_KINDS)
    assert kind == "rating"
    assert rows[0].fields["rating"] == 4.5


# --- errors name file, line (or row) and field ------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "place"),
    [
        ("jsonl", ":3"),
        ("json", " item 2"),  # position in the JSON list, counted from 0
        ("csv", ":4"),  # line 1 is the header
        ("parquet", " row 3"),
        ("datasets", " row 3"),
    ],
)
def test_bad_record_error_names_file_place_and_field(tmp_path, writers, fmt, place):
    # An empty completion: the one flaw every format (CSV's blank cell included) can hold.
    path = writers[fmt](tmp_path, PROMPT_COMPLETION[:2] + [{"prompt": "Lonely prompt", "completion": ""}])
    with pytest.raises(DataError) as e:
        load_records(str(path), SFT_KINDS)
    assert str(e.value).startswith(f"{path}{place}: field 'completion' is empty")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "datasets"])
def test_null_field_is_missing_and_names_file_place_and_field(tmp_path, writers, fmt):
    path = writers[fmt](tmp_path, PROMPT_COMPLETION[:2] + [{"prompt": "Lonely prompt", "completion": None}])
    with pytest.raises(DataError) as e:
        load_records(str(path), SFT_KINDS)
    assert re.match(re.escape(str(path)) + r"(:3| item 2| row 3): field 'completion' missing; ", str(e.value))
    assert "needs prompt, completion" in str(e.value)


def test_absent_key_is_reported_like_a_null_one(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", PROMPT_COMPLETION[:2] + [{"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: field 'completion' missing")):
        load_records(str(path), SFT_KINDS)


def test_malformed_json_line_is_named(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [PROMPT_COMPLETION[0], '{"prompt": "a", "completion": ', PROMPT_COMPLETION[1]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid JSON")):
        read_rows(str(path))


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [PROMPT_COMPLETION[0], "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        read_rows(str(path))


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid JSON")):
        read_rows(str(path))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": 5, "completion": "c"}, "field 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": "p", "completion": {"text": "c"}}, "field 'completion' must be a string or a list of messages, got dict"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}, "fields 'prompt' and 'completion' must both be"),
        ({"prompt": "p", "completion": " "}, "field 'completion' is empty"),
        ({"messages": "hello"}, "field 'messages' must be a non-empty list of messages"),
        ({"messages": []}, "field 'messages' must be a non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, "field 'messages[0]' must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "b"}]}, "field 'messages[1].role' is 'bot'"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": 3}]}, "field 'messages[1].content' must be a string"),
        ({"messages": [{"role": "user", "content": "u"}]}, "field 'messages' has no assistant message"),
    ],
)
def test_wrong_field_type_names_line_and_field(tmp_path, write_jsonl, record, message):
    kind_of_first = PROMPT_COMPLETION[0] if "prompt" in record else CHAT[0]
    path = write_jsonl(tmp_path / "x.jsonl", [kind_of_first, record])
    with pytest.raises(DataError) as e:
        load_records(str(path), SFT_KINDS)
    assert str(e.value).startswith(f"{path}:2: {message}")


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p", "completion": "c", "label": "maybe"}, "'label' must be true or false, got 'maybe'"),
        ({"prompt": "p", "completion": "c", "label": 2}, "'label' must be true or false, got 2"),
        ({"prompt": "p", "completion": "c", "rating": "high"}, "'rating' must be a number, got 'high'"),
        ({"text": 12}, "'text' must be a string, got int"),
        ({"text": "   "}, "'text' is empty"),
    ],
)
def test_wrong_value_of_other_kinds_names_line_and_field(tmp_path, write_jsonl, record, field):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError) as e:
        load_records(str(path), ALL_KINDS)
    assert str(e.value).startswith(f"{path}:1: field {field}")


BANDIT_TEXT = {"text": "so happy", "shown": "joy", "propensity": 0.925, "reward": 1}
BANDIT_ENTITY = {"tokens": ["Barack", "Obama", "spoke"], "start": 0, "end": 2, "shown": "PER", "propensity": 0.81, "reward": 0}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**BANDIT_TEXT, "propensity": 0}, "field 'propensity' is 0; a probability in (0, 1]"),
        ({**BANDIT_TEXT, "propensity": 1.5}, "field 'propensity' is 1.5; a probability in (0, 1]"),
        ({**BANDIT_TEXT, "propensity": "high"}, "field 'propensity' must be a number, got 'high'"),
        ({**BANDIT_TEXT, "reward": 2}, "field 'reward' is 2; 1 (correct), 0 (wrong)"),
        ({**BANDIT_TEXT, "reward": "yes"}, "field 'reward' must be a number, got 'yes'"),
        ({**BANDIT_TEXT, "shown": ""}, "field 'shown' must be a class name or an integer id"),
        ({**BANDIT_TEXT, "label": True}, "field 'label' must be a class name or an integer id, got True"),
        ({**BANDIT_TEXT, "text": " "}, "field 'text' is empty"),
        ({"shown": "joy", "propensity": 0.5, "reward": 1}, "field 'text' missing; a bandit feedback record needs text"),
        ({**BANDIT_ENTITY, "end": 4}, "field 'end' is 4 with start 0; need 0 ≤ start < end ≤ 3"),
        ({**BANDIT_ENTITY, "start": 2, "end": 2}, "field 'end' is 2 with start 2"),
        ({**BANDIT_ENTITY, "start": 1.5}, "field 'start' must be a word index (an integer), got 1.5"),
        ({key: v for key, v in BANDIT_ENTITY.items() if key != "end"}, "field 'end' missing; an NER bandit record"),
        ({**BANDIT_ENTITY, "tokens": []}, "field 'tokens' must be a non-empty list"),
    ],
)
def test_bad_bandit_record_names_line_and_field(tmp_path, write_jsonl, record, message):
    path = write_jsonl(tmp_path / "feedback.jsonl", [BANDIT_TEXT if "text" in record else BANDIT_ENTITY, record])
    with pytest.raises(DataError) as e:
        load_records(str(path), ("bandit",))
    assert str(e.value).startswith(f"{path}:2: {message}")


def test_bandit_csv_cells_become_numbers(tmp_path):
    path = write_csv(tmp_path / "feedback.csv", [{**BANDIT_ENTITY, "tokens": None, "text": "hi", "reward": "true"}])
    rows, kind = load_records(str(path), ("bandit", "labelled"))
    assert kind == "bandit"
    assert (rows[0].fields["propensity"], rows[0].fields["reward"]) == (0.81, 1.0)


def test_records_must_all_be_of_the_first_records_kind(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "mixed.jsonl", [PROMPT_COMPLETION[0], CHAT[0]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'prompt' missing")):
        load_records(str(path), SFT_KINDS)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"), ("header_only.csv", "prompt,completion\n")],
)
def test_empty_dataset_says_no_records(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no records")):
        load_records(str(path), SFT_KINDS)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}: data file not found")):
        load_records(str(path), SFT_KINDS)


def test_unknown_suffix_lists_the_supported_ones(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=re.escape(f"{path}: unknown file type '.xlsx'") + ".*jsonl"):
        read_rows(str(path))


def test_unknown_builtin_dataset_lists_the_builtins():
    with pytest.raises(DataError, match=r"builtin:nope: unknown built-in dataset.*builtin:chitchat-chat"):
        read_rows("builtin:nope")


def test_builtin_thumbs_are_the_preference_pairs_unpaired():
    pytest.importorskip("chitchat_dataset")
    pairs, _ = load_records("builtin:chitchat-preference", ("preference",))
    thumbs, kind = load_records("builtin:chitchat-thumbs", ("binary",))
    assert kind == "binary" and len(thumbs) == len(pairs)
    assert [t.fields["label"] for t in thumbs[:4]] == [True, False, True, False]
    assert thumbs[0].fields["completion"] == pairs[0].fields["chosen"]
    assert thumbs[1].fields["completion"] == pairs[1].fields["rejected"]


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable Parquet file")):
        read_rows(str(path))


# --- batching ------------------------------------------------------------------------------------
def epoch_indices(batches: ShuffledBatches, epoch: int) -> list[int]:
    first = epoch * batches.batches_per_epoch
    return [i for b in range(first, first + batches.batches_per_epoch) for i in batches.indices(b)]


def test_batches_are_a_function_of_seed_and_batch_number():
    a, b = ShuffledBatches(20, 4, seed=3), ShuffledBatches(20, 4, seed=3)
    assert [a.indices(n) for n in range(12)] == [b.indices(n) for n in range(12)]
    # Random access (as after a resume) gives the same batch as sequential reading.
    assert ShuffledBatches(20, 4, seed=3).indices(7) == a.indices(7)
    assert [ShuffledBatches(20, 4, seed=4).indices(n) for n in range(5)] != [a.indices(n) for n in range(5)]


def test_each_epoch_is_a_fresh_permutation():
    batches = ShuffledBatches(12, 3, seed=0)
    assert batches.batches_per_epoch == 4
    epochs = [epoch_indices(batches, e) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(len(batches.indices(n)) == 3 for n in range(12))


def test_partial_last_batch_of_an_epoch_is_dropped_without_repeats():
    batches = ShuffledBatches(10, 4, seed=0)
    assert batches.batches_per_epoch == 2
    order = epoch_indices(batches, 0)
    assert len(order) == 8 and len(set(order)) == 8


def test_two_processes_get_disjoint_halves_of_each_global_batch():
    single = ShuffledBatches(16, 4, seed=1)  # one process, global batch 4
    rank0 = ShuffledBatches(16, 2, seed=1, rank=0, world_size=2)
    rank1 = ShuffledBatches(16, 2, seed=1, rank=1, world_size=2)
    for n in range(8):  # two epochs
        left, right = rank0.indices(n), rank1.indices(n)
        assert len(left) == len(right) == 2
        assert not set(left) & set(right)
        assert left + right == single.indices(n)


def test_batches_by_group_hold_one_group_where_possible_and_cover_the_epoch():
    groups = [i % 5 for i in range(60)]  # 5 groups of 12; batches of 4 fit a group exactly
    batches = ShuffledBatches(60, 4, seed=2, groups=groups)
    for epoch in range(2):
        order = epoch_indices(batches, epoch)
        assert sorted(order) == list(range(60))
        for b in range(epoch * 15, epoch * 15 + 15):
            assert len({groups[i] for i in batches.indices(b)}) == 1
    assert epoch_indices(batches, 0) != epoch_indices(batches, 1)
    assert ShuffledBatches(60, 4, seed=2, groups=groups).indices(17) == batches.indices(17)  # resumable
    # Uneven groups: a batch spans at most two groups, and still nothing repeats within an epoch.
    uneven = [0] * 7 + [1] * 5 + [2] * 9 + [3] * 3
    batches = ShuffledBatches(24, 4, seed=0, groups=uneven)
    order = epoch_indices(batches, 0)
    assert len(order) == len(set(order)) == 24
    assert all(len({uneven[i] for i in batches.indices(b)}) <= 2 for b in range(6))


def test_packed_batches_cover_few_distinct_sides_and_each_example_once():
    # 3 prompts, each with 10 responses compared all against all (45 pairs): batches of 8 pairs of
    # one prompt cover ~8.7 of its responses, packed ones ~5.
    sides, groups = [], []
    for prompt in range(3):
        for a in range(10):
            for b in range(a + 1, 10):
                sides.append((f"{prompt}/{a}", f"{prompt}/{b}"))
                groups.append(prompt)
    packed = ShuffledBatches(len(sides), 8, seed=0, groups=groups, sides=sides)
    grouped = ShuffledBatches(len(sides), 8, seed=0, groups=groups)

    def mean_distinct(batches: ShuffledBatches) -> float:
        covered = [len({s for i in batches.indices(b) for s in sides[i]}) for b in range(batches.batches_per_epoch)]
        return sum(covered) / len(covered)

    assert mean_distinct(packed) < 6.5 < 8 < mean_distinct(grouped)
    for epoch in range(2):
        order = epoch_indices(packed, epoch)
        assert len(order) == len(set(order)) == 16 * 8
    assert epoch_indices(packed, 0) != epoch_indices(packed, 1)
    assert ShuffledBatches(len(sides), 8, seed=0, groups=groups, sides=sides).indices(21) == packed.indices(21)
    assert pack_shared_sides([[0, 1, 2]], [("x", "y"), ("z", "w"), ("y", "x")], 2) == [0, 2, 1]


def test_fewer_examples_than_one_batch_is_refused():
    with pytest.raises(DataError, match="fewer than one batch.*train.batch_size"):
        ShuffledBatches(5, 4, seed=0, world_size=2)


def test_split_holdout_is_deterministic_disjoint_and_complete():
    items = [f"record {i}" for i in range(40)]
    train, held = split_holdout(items, 0.25, seed=7)

    assert (train, held) == split_holdout(items, 0.25, seed=7)
    assert split_holdout(items, 0.25, seed=8) != (train, held)
    assert len(held) == 10
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(items)
    assert train == [x for x in items if x in set(train)]  # training keeps the file order


def test_split_holdout_keeps_everything_without_a_fraction_and_holds_at_least_one():
    items = list(range(5))
    assert split_holdout(items, 0.0, seed=0) == (items, [])
    assert split_holdout([1], 0.5, seed=0) == ([1], [])
    train, held = split_holdout(items, 0.01, seed=0)
    assert len(held) == 1 and len(train) == 4


def test_collate_pads_right_and_ignores_padding_and_masked_tokens():
    examples = [Example([5, 6, 7, 8], [0, 0, 1, 1]), Example([9, 10], [0, 1])]

    batch = collate(examples, pad_token_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_masks_padding_even_when_pad_id_is_a_real_token():
    # Models without a pad token pad with EOS, which is also a trained token.
    batch = collate([Example([3, 2], [0, 1]), Example([3], [0])], pad_token_id=2)
    assert batch["labels"].tolist() == [[-100, 2], [-100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
