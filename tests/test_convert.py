"""Converting the human-preference files people have (Anthropic HH-RLHF, UKPConvArg1Strict) into
TRL preference records, and reading them through ``hh-rlhf:`` / ``ukp:`` paths."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from alignloop.data.convert import convert_hh_rlhf, read_ukp_convarg, write_jsonl
from alignloop.data.load import load_records, read_hh_rlhf, read_rows
from alignloop.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
UKP_STRICT = SHARED_DATA / "ukpconvarg1" / "UKPConvArg1Strict-CSV"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# --- hh-rlhf ---------------------------------------------------------------------------------
DIALOGUE = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: How do I pick a lock?"
THREE_TURNS = {
    "chosen": DIALOGUE + "\n\nAssistant: I'd rather not help with that. ",
    "rejected": DIALOGUE + "\n\nAssistant: Use a tension wrench and a pick.",
}
# Diverges before the last reply: the chosen side has two Assistant turns in a row, and one of
# them holds the "Human:" artifact that stays inside its turn.
DIVERGING = {
    "chosen": "\n\nHuman: Rob a house?\n\nAssistant: Human: No.  Human: Why?\n\nAssistant: It is a crime.",
    "rejected": "\n\nHuman: Rob a house?\n\nAssistant: Go at 3 AM.",
}
EMPTY_REPLY = {
    "chosen": "\n\nHuman: Say something rude.\n\nAssistant:",
    "rejected": "\n\nHuman: Say something rude.\n\nAssistant: You idiot.",
}
IDENTICAL = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hi!", "rejected": "\n\nHuman: Hi\n\nAssistant:  Hi! "}


def write_hh(path: Path, pairs: list) -> Path:
    """hh-rlhf lines: dicts as JSON, strings verbatim; gzip when the name ends in .gz."""
    text = "".join((p if isinstance(p, str) else json.dumps(p)) + "\n" for p in pairs)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_hh_rlhf_pairs_become_conversational_preferences(tmp_path: Path) -> None:
    path = write_hh(tmp_path / "test.jsonl", [THREE_TURNS, DIVERGING, EMPTY_REPLY, IDENTICAL])
    rows, counts = convert_hh_rlhf(read_rows(str(path)))

    assert [row.where for row in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert rows[0].fields == {
        "prompt": [user("Hi there."), assistant("Hello! How can I help?"), user("How do I pick a lock?")],
        "chosen": [assistant("I'd rather not help with that.")],
        "rejected": [assistant("Use a tension wrench and a pick.")],
    }
    # Longest shared run of turns as the prompt; each side keeps all of its remaining turns.
    assert rows[1].fields == {
        "prompt": [user("Rob a house?")],
        "chosen": [assistant("Human: No.  Human: Why?"), assistant("It is a crime.")],
        "rejected": [assistant("Go at 3 AM.")],
    }
    # An empty final reply is kept: empty content is a valid message.
    assert rows[2].fields["chosen"] == [assistant("")]
    assert (counts.pairs, counts.kept, counts.diverged, counts.empty_reply) == (4, 3, 1, 1)
    assert (counts.identical, counts.no_shared_prompt) == (1, 0)


def test_hh_rlhf_pairs_without_a_shared_first_turn_are_dropped_and_counted(tmp_path: Path) -> None:
    pair = {"chosen": "\n\nHuman: A?\n\nAssistant: a", "rejected": "\n\nHuman: B?\n\nAssistant: b"}
    rows, counts = convert_hh_rlhf(read_rows(str(write_hh(tmp_path / "x.jsonl", [pair, THREE_TURNS]))))
    assert len(rows) == 1 and counts.no_shared_prompt == 1


def test_hh_rlhf_prefix_reads_gzip_and_validates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_hh(tmp_path / "test.jsonl.gz", [THREE_TURNS, EMPTY_REPLY, IDENTICAL])
    with caplog.at_level(logging.INFO, logger="alignloop"):
        rows, kind = load_records(f"hh-rlhf:{path}", ("preference",))
    assert kind == "preference"
    assert [row.where for row in rows] == [f"{path}:1", f"{path}:2"]
    assert rows[0].fields["chosen"] == [assistant("I'd rather not help with that.")]
    assert "2 of 3 hh-rlhf pairs kept" in caplog.text and "dropped 1 identical" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hi"', "not valid JSON"),
        ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hi"}', "field 'rejected' missing"),
        ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hi", "rejected": 3}', "'rejected' must be a transcript string"),
        ('{"chosen": "Hi there", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Hi"}', "'chosen' is not an hh-rlhf"),
        (json.dumps({"chosen": DIALOGUE, "rejected": THREE_TURNS["rejected"]}), "'chosen' ends with a Human turn"),
    ],
)
def test_hh_rlhf_malformed_line_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = write_hh(tmp_path / "bad.jsonl", [THREE_TURNS, line])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: ") as error:
        read_hh_rlhf(path)
    assert message in str(error.value)


# --- UKPConvArg1Strict ---------------------------------------------------------------------------
UKP_HEADER = "#id\tlabel\ta1\ta2\n"
UKP_ECONOMY = (
    UKP_HEADER
    + 'arg1_arg2\ta2\tjesus loves "plastic" bottles\tIt creates jobs.<br/>Lots of them, for "real".\n'
    + "arg3_arg4\ta1\tBottled water is a $10 billion industry. \tPlastic is fine\n"
)
UKP_EMERGENCIES = UKP_HEADER + "arg5_arg6\ta1\tOnly in emergencies.\tBan them all!\n"


def write_ukp(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_ukp_file_rows_become_plain_text_preferences(tmp_path: Path) -> None:
    folder = write_ukp(tmp_path / "strict", {"ban-plastic-water-bottles_no-bad-for-the-economy.csv": UKP_ECONOMY})
    path = folder / "ban-plastic-water-bottles_no-bad-for-the-economy.csv"
    rows = read_ukp_convarg(path)

    prompt = "Debate: ban plastic water bottles\nStance: no bad for the economy\n\n"
    common = {"prompt": prompt, "group": "ban-plastic-water-bottles", "stance": "no-bad-for-the-economy"}
    assert [row.fields for row in rows] == [
        {
            **common,
            "chosen": 'It creates jobs.\nLots of them, for "real".',
            "rejected": 'jesus loves "plastic" bottles',
            "id": "arg1_arg2",
        },
        {
            **common,
            "chosen": "Bottled water is a $10 billion industry.",
            "rejected": "Plastic is fine",
            "id": "arg3_arg4",
        },
    ]
    assert [row.where for row in rows] == [f"{path}:2", f"{path}:3"]


def test_ukp_folder_reads_every_file_in_order_and_both_stances_share_a_group(tmp_path: Path) -> None:
    folder = write_ukp(
        tmp_path / "strict",
        {
            "ban-plastic-water-bottles_yes-emergencies-only.csv": UKP_EMERGENCIES,
            "ban-plastic-water-bottles_no-bad-for-the-economy.csv": UKP_ECONOMY,
            "christianity-or-atheism-_atheism.csv": UKP_HEADER + "arg7_arg8\ta2\tNo god.\tReason!\n",
            "readme.txt": "not data",
        },
    )
    rows, kind = load_records(f"ukp:{folder}", ("preference",))
    assert kind == "preference"
    assert [row.fields["id"] for row in rows] == ["arg1_arg2", "arg3_arg4", "arg5_arg6", "arg7_arg8"]
    assert [row.fields["group"] for row in rows] == ["ban-plastic-water-bottles"] * 3 + ["christianity-or-atheism-"]
    assert rows[2].fields["stance"] == "yes-emergencies-only"
    assert rows[3].fields["prompt"] == "Debate: christianity or atheism\nStance: atheism\n\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("arg1_arg2\ta3\tOne.\tTwo.", "field 'label' is 'a3'; expected a1 or a2"),
        ("arg1_arg2\ta1\tOne.", "3 tab-separated columns; expected 4"),
    ],
)
def test_ukp_bad_row_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    folder = write_ukp(tmp_path, {"topic_stance.csv": UKP_EMERGENCIES + line + "\n"})
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'topic_stance.csv'))}:3: ") as error:
        read_rows(f"ukp:{folder}")
    assert message in str(error.value)


def test_ukp_missing_path_and_empty_folder_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        read_ukp_convarg(tmp_path / "nope")
    with pytest.raises(DataError, match="no .csv files"):
        read_ukp_convarg(tmp_path)


# --- writing and plain .jsonl.gz ---------------------------------------------------------------
def test_write_jsonl_round_trips_through_the_jsonl_reader(tmp_path: Path) -> None:
    rows = read_hh_rlhf(write_hh(tmp_path / "hh.jsonl", [THREE_TURNS, DIVERGING]))
    rows[0].fields["chosen"][0]["content"] = "Désolé, non."
    out = tmp_path / "out" / "prefs.jsonl"
    write_jsonl((row.fields for row in rows), out)
    assert "Désolé" in out.read_text(encoding="utf-8")
    assert [row.fields for row in read_rows(str(out))] == [row.fields for row in rows]


def test_plain_jsonl_gz_is_read_like_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}) + "\n\n{oops\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: not valid JSON"):
        read_rows(str(path))
    path.write_bytes(gzip.compress(b'{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}\n'))
    rows, kind = load_records(str(path), ("preference",))
    assert kind == "preference" and rows[0].where == f"{path}:1"


# --- the real files, where this machine has them -------------------------------------------------
def test_real_hh_rlhf_and_ukp_files_convert() -> None:
    if not HH_TEST.is_file() or not UKP_STRICT.is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATA}")
    rows, counts = convert_hh_rlhf(read_rows(str(HH_TEST)))
    assert (counts.pairs, counts.kept, counts.diverged, counts.empty_reply) == (2312, 2312, 5, 4)
    assert (counts.identical, counts.no_shared_prompt) == (0, 0)
    assert len(load_records(f"hh-rlhf:{HH_TEST}", ("preference",))[0]) == 2312

    ukp, kind = load_records(f"ukp:{UKP_STRICT}", ("preference",))
    assert len(ukp) == 11650 and kind == "preference"
    assert len({row.fields["group"] for row in ukp}) == 16
    assert not any("<br/>" in row.fields["chosen"] + row.fields["rejected"] for row in ukp)
