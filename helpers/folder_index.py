"""The files of predict.py's folder mode in OUT: the mask names, and index.csv (helpers/batch_predict.py).

- A mask's name: '<image key>/<phrase, letters and digits, 40 at most>-<16 hex>.png' (`mask_name`); the hex
  is 64 bits of the phrase's SHA-256, and two phrases that would still share a name are told apart by a
  counter ('-2.png', '-3.png': `name_for`), so that no two phrases ever share a file.
- index.csv: one row per mask written, COLUMNS. A cell that a spreadsheet would run as a formula (it
  starts with =, +, -, @, a tab or a carriage return: OWASP's "CSV Injection") is written with a single
  quote in front, and so is a cell that starts with a quote, so that a reader takes exactly one leading
  quote off any cell that has one (`cell`, `uncell`); the file stays plain CSV (Python's csv, pandas).
- `index_rows` reads it with csv on the whole text (newline=''), so a name holding a line break or U+2028
  is one cell; a row a killed run left half-written is found by its missing end, and cut only once the
  file is known to be this tool's (`cut_to`), never a user's.
"""
import contextlib
import csv
import hashlib
import io
import itertools
import os
import re
from pathlib import Path

from helpers.cli import shown

INDEX = "index.csv"
COLUMNS = ("image", "phrase", "mask", "fraction", "width", "height")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what Excel, LibreOffice and Sheets read as a formula's start
QUOTE = "'"  # a spreadsheet shows a cell that starts with it as text, without the quote


def phrase_digest(phrase) -> str:
    """16 hex digits (64 bits) of the phrase's SHA-256: its part of a mask's name."""
    return hashlib.sha256(phrase.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def mask_name(key, phrase, number=1) -> str:
    """The mask of `phrase` on the image whose key is `key` (batch_predict's rule), relative to OUT:
    '<key>/<phrase, letters and digits>-<16 hex>.png'; number n > 1 (a name already taken by another
    phrase, `name_for`) adds '-n' before '.png'."""
    return f"{key}/{phrase_stem(phrase)}{'' if number == 1 else f'-{number}'}.png"


def phrase_stem(phrase) -> str:
    """'<phrase, letters and digits, 40 at most>-<16 hex>': what a phrase's mask names start with."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", phrase).strip("_")[:40] or "phrase"
    return f"{slug}-{phrase_digest(phrase)}"


def name_for(key, phrase, listed, taken, stem=None) -> tuple:
    """(the name of `phrase`'s mask on image `key`, whether the index lists it done). The first of mask_name's
    names (1, 2, 3, ...) that the index (`listed`: {mask: row}) gives to this phrase, else the first that
    neither the index gives another phrase nor `taken` (this run's names for other phrases) holds. stem:
    phrase_stem(phrase), computed once by a caller that asks for many images."""
    stem = stem or phrase_stem(phrase)
    for number in itertools.count(1):
        name = f"{key}/{stem}{'' if number == 1 else f'-{number}'}.png"
        row = listed.get(name)
        if row is not None and row["phrase"] == phrase:
            return name, True
        if row is None and name not in taken:
            return name, False


def cell(text) -> str:
    """A cell as index.csv holds it: a quote in front of one that a spreadsheet would run as a formula, or
    that starts with a quote itself (so that `uncell` is exact)."""
    text = str(text)
    return QUOTE + text if text.startswith(FORMULA_START + (QUOTE,)) else text


def uncell(text) -> str:
    """The value of an index.csv cell: `cell` undone (one leading quote taken off)."""
    return text[1:] if text.startswith(QUOTE) else text


def write_row(writer, values) -> None:
    writer.writerow([cell(value) for value in values])


def index_rows(path) -> tuple:
    """({mask: row dict} of the complete rows, the length in bytes of the complete records) of an index this
    tool wrote (the caller has checked that: it is in OUT's record and a regular file). The last row of a
    killed run, without its line end or inside an open quote, is not complete: `cut_to` drops it. A
    ValueError naming the file when its first row is not COLUMNS or a row is not CSV."""
    path = Path(path)
    data = path.read_bytes()
    text = data.decode("utf-8", errors="surrogateescape")
    lines = io.StringIO(text, newline="").readlines()  # line ends kept: \n, \r\n or \r
    ends = list(itertools.accumulate(map(len, lines)))
    reader = csv.reader(lines, strict=True)
    records, complete = [], 0
    try:
        for row in reader:
            if reader.line_num == len(lines) and not lines[-1].endswith("\n"):
                break  # the last line, cut short by a kill
            records.append(row)
            complete = ends[reader.line_num - 1]
    except csv.Error as e:
        if reader.line_num < len(lines) or "unexpected end of data" not in str(e):
            raise ValueError(f"{shown(path)}, line {reader.line_num}: not CSV ({e}); it is not an index as predict.py "
                             f"writes it: move it, or name another --out") from None
    if records and tuple(records[0]) != COLUMNS:
        raise ValueError(f"{shown(path)} is not an index written by predict.py (expected the columns "
                         f"{', '.join(COLUMNS)}); move it, or name another --out")
    rows = {}
    for row in records[1:]:
        if len(row) == len(COLUMNS):  # a row of another length is no pair: its pair is done again
            values = dict(zip(COLUMNS, map(uncell, row)))
            rows[values["mask"]] = values
    return rows, len(text[:complete].encode("utf-8", errors="surrogateescape"))


def open_index(path, keep):
    """index.csv opened to append rows, its bytes after `keep` (a half-written row) cut first; never through a
    symbolic link (O_NOFOLLOW). A new (or emptied) index gets the header row. -> (file, csv writer)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with contextlib.ExitStack() as undo:
        undo.callback(os.close, fd)
        if os.fstat(fd).st_size > keep:
            os.ftruncate(fd, keep)
        os.lseek(fd, 0, os.SEEK_END)
        f = open(fd, "a", newline="", encoding="utf-8", errors="surrogateescape")
        undo.pop_all()
    writer = csv.writer(f)
    if keep == 0:
        writer.writerow(COLUMNS)
        f.flush()
    return f, writer
