"""Reading records from files a user already has: JSONL, JSON, CSV, Parquet, plain text, a
`datasets` folder saved with ``save_to_disk``, an embedded ``builtin:NAME`` set, HH-RLHF and
UKPConvArg1 files (``hh-rlhf:PATH``, ``ukp:PATH``; converted by :mod:`alignloop.data.convert`),
tab-separated labelled sentences (``.tsv`` or ``tsv:PATH``: SST-2/GLUE with a header, or UCI's
headerless ``sentence<TAB>label`` .txt files), TweetEval's paired text and label files
(``tweeteval:DIR/SPLIT``) and CoNLL token/tag files (``conll:PATH`` or ``.conll``; NER).

Each reader yields :class:`Row` objects tagged with their place (``file:line`` or ``file row N``)
and nothing else; validation of fields is :mod:`alignloop.data.records`' job.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
import re
from pathlib import Path
from typing import Iterable

from alignloop.data.convert import convert_hh_rlhf, read_ukp_convarg
from alignloop.data.records import Row, validate_rows
from alignloop.errors import DataError

log = logging.getLogger("alignloop")

# WikiANN writes every token with its language in front (`en:Paris`); no other CoNLL set we read does.
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}:(?=.)")

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll")


def load_records(path: str, accepted: Iterable[str], max_samples: int | None = None) -> tuple[list[Row], str]:
    """Read and validate the records at ``path``; return them and their kind (one of ``accepted``)."""
    rows = read_rows(path)
    if max_samples is not None:
        rows = rows[:max_samples]
    kind = validate_rows(rows, accepted, source=path)
    return rows, kind


def read_rows(path: str) -> list[Row]:
    """All rows at ``path`` (a file, a glob of files, a `datasets` folder, ``builtin:NAME``, or a
    foreign preference format named by its prefix: ``hh-rlhf:FILE``, ``ukp:FOLDER_OR_FILE``)."""
    if path.startswith("builtin:"):
        from alignloop.data.builtin import builtin_rows

        return builtin_rows(path.removeprefix("builtin:"))
    if path.startswith("hh-rlhf:"):
        return read_hh_rlhf(path.removeprefix("hh-rlhf:"))
    if path.startswith("ukp:"):
        return read_ukp_convarg(path.removeprefix("ukp:"))
    if path.startswith("tsv:"):  # UCI's sentences are tab-separated .txt files
        return _read_tsv(_existing(path.removeprefix("tsv:")))
    if path.startswith("conll:"):
        return _read_conll(_existing(path.removeprefix("conll:")))
    if path.startswith("tweeteval:"):
        return _read_tweeteval(path.removeprefix("tweeteval:"))
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        return [row for file in files for row in read_rows(file)]
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    if p.name.lower().endswith(".jsonl.gz"):
        return _read_jsonl(p)
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_tsv,
        ".conll": _read_conll,
        ".parquet": _read_parquet,
        ".txt": _read_text,
    }.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type '{p.suffix}'; use one of {', '.join(SUFFIXES)} or a `datasets` folder")
    return reader(p)


def read_hh_rlhf(path: str | Path) -> list[Row]:
    """Conversational preference records from an hh-rlhf JSONL file (``.jsonl`` or ``.jsonl.gz``).

    Logs how many pairs were kept, diverged and dropped; :func:`convert_hh_rlhf` returns the counts.
    """
    rows, counts = convert_hh_rlhf(read_rows(str(path)))
    log.info(
        "%s: %d of %d hh-rlhf pairs kept (%d diverged before the last reply, %d with an empty reply); "
        "dropped %d identical and %d with no shared prompt",
        path, counts.kept, counts.pairs, counts.diverged, counts.empty_reply, counts.identical, counts.no_shared_prompt,
    )
    return rows


def _existing(path: str) -> Path:
    if not Path(path).is_file():
        raise DataError(f"{path}: data file not found")
    return Path(path)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")
    with opened as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(Row(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    rows = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, f"{path} item {i}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            # Chat fields in a CSV cell are JSON text; decode them so they validate as messages.
            fields = {k: _maybe_json_list(v) for k, v in record.items() if k is not None}
            rows.append(Row(fields, f"{path}:{reader.line_num}"))
    return rows


def _read_tsv(path: Path) -> list[Row]:
    """Labelled sentences, one per line: ``text<TAB>label``.

    With a header line (SST-2 and GLUE: ``sentence<TAB>label``) the columns take its names, GLUE's
    ``sentence`` read as ``text``; without one (UCI Sentiment Labelled Sentences, where the first
    line already ends in a 0/1 label) the columns are ``text`` and ``label``. Integer labels become
    ints. Fields are stripped (UCI's sentences end in spaces).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[0].split("\t") if lines else []
    has_header = not (len(first) >= 2 and first[-1].strip().lstrip("-").isdigit())
    names = ["text" if n.strip() == "sentence" else n.strip() for n in first] if has_header else ["text", "label"]
    rows = []
    for lineno, line in enumerate(lines[1:] if has_header else lines, start=2 if has_header else 1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != len(names):
            raise DataError(f"{path}:{lineno}: {len(cells)} tab-separated fields, expected {len(names)} ({', '.join(names)})")
        fields = dict(zip(names, cells))
        if fields.get("label", "").lstrip("-").isdigit():
            fields["label"] = int(fields["label"])
        rows.append(Row(fields, f"{path}:{lineno}"))
    return rows


def _read_conll(path: Path) -> list[Row]:
    """CoNLL NER: ``token<TAB>tag`` (or space-separated, tag last) per line, a blank line (or a lone
    tab, as in WNUT-17's train file) between sentences; ``-DOCSTART-`` lines are skipped. One row
    ``{tokens, tags}`` per sentence, placed at its first line."""
    rows, tokens, tags, start = [], [], [], 0
    for lineno, line in enumerate([*path.read_text(encoding="utf-8").splitlines(), ""], start=1):
        if not line.strip():
            if tokens:
                rows.append(Row({"tokens": tokens, "tags": tags}, f"{path}:{start}"))
            tokens, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        cells = line.split("\t") if "\t" in line else line.split()
        if len(cells) < 2 or not cells[0] or not cells[-1].strip():
            raise DataError(f"{path}:{lineno}: expected 'token<TAB>tag', got {line!r}")
        start = start if tokens else lineno
        tokens.append(cells[0])
        tags.append(cells[-1].strip())
    return _without_language_prefix(rows, path)


def _without_language_prefix(rows: list[Row], path: Path) -> list[Row]:
    """WikiANN's tokens without their ``en:`` language prefix, when every token of the file has one
    (a file where only some do, say a URL ``http:…``, keeps its tokens as they are)."""
    tokens = [t for row in rows for t in row.fields["tokens"]]
    if not tokens or not all(_LANGUAGE_PREFIX.match(t) for t in tokens):
        return rows
    log.info("%s: every token starts with a language prefix (WikiANN's `%s`); stripped", path, tokens[0].split(":", 1)[0] + ":")
    return [Row({**row.fields, "tokens": [t.split(":", 1)[1] for t in row.fields["tokens"]]}, row.where) for row in rows]


def _read_tweeteval(path: str) -> list[Row]:
    """TweetEval's layout (cardiffnlp/tweeteval): ``DIR/SPLIT`` names ``SPLIT_text.txt`` (one text a
    line) and ``SPLIT_labels.txt`` (one class id a line), with ``DIR/mapping.txt`` (``id<TAB>name``)
    turning ids into names when present. Rows are placed at their line of the text file."""
    stem = Path(path)
    text_file, label_file = stem.parent / f"{stem.name}_text.txt", stem.parent / f"{stem.name}_labels.txt"
    for needed in (text_file, label_file):
        if not needed.is_file():
            raise DataError(f"tweeteval:{path}: {needed} not found; tweeteval:DIR/SPLIT reads DIR/SPLIT_text.txt and DIR/SPLIT_labels.txt")
    names: dict[str, str] = {}
    mapping = stem.parent / "mapping.txt"
    if mapping.is_file():
        for lineno, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                cells = line.split("\t") if "\t" in line else line.split(None, 1)
                if len(cells) != 2:
                    raise DataError(f"{mapping}:{lineno}: expected 'id<TAB>name', got {line!r}")
                names[cells[0].strip()] = cells[1].strip()
    # Split on "\n" only: a tweet may hold other line separators (U+2028) that splitlines() would cut at.
    texts = text_file.read_text(encoding="utf-8").rstrip("\n").split("\n")
    labels = label_file.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if len(texts) != len(labels):
        raise DataError(f"{label_file}: {len(labels)} labels for {len(texts)} texts in {text_file.name}; give one label a line")
    rows = []
    for lineno, (text, label) in enumerate(zip(texts, labels), start=1):
        label = label.strip()
        if names and label not in names:
            raise DataError(f"{label_file}:{lineno}: field 'label' is {label!r}, not an id of {mapping} ({', '.join(names)})")
        if not names and not label.lstrip("-").isdigit():
            raise DataError(f"{label_file}:{lineno}: field 'label' is {label!r}; expected a class id (no mapping.txt beside it)")
        rows.append(Row({"text": text.strip(), "label": names[label] if names else int(label)}, f"{text_file}:{lineno}"))
    return rows


def _maybe_json_list(value: str | None) -> object:
    if value and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [Row(obj, f"{path} row {i + 1}") for i, obj in enumerate(table.to_pylist())]


def _read_text(path: Path) -> list[Row]:
    return [Row({"text": path.read_text(encoding="utf-8")}, str(path))]


def _read_saved_dataset(path: Path) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` folder needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a folder, but not a dataset saved with `save_to_disk`") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); point at one split's folder")
        ds = ds["train"]
    return [Row(dict(obj), f"{path} row {i + 1}") for i, obj in enumerate(ds)]
