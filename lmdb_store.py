"""The one LMDB format every source of data is converted to (one file per split, no pickle).

    b"__header__"      JSON {format, version, split, num_tasks, num_images, skipped_tasks, ...}
    b"img/<image_id>"  the image file's own bytes, stored once however many phrases share it
    b"task/<i:08d>"    one JSON task record

The file is written as .NAME.tmp-PID and renamed when complete (files.atomic_path), so a killed run
never leaves a file that looks finished. The reader compares the file's size with the page count
LMDB records in its first page, so a truncated copy is reported as such (reading past the end of a
mapped file would be a bus error). LMDB stores each value over ~2 KB in whole 4 KiB pages, so small
images pay more.
"""
import json
import os

import lmdb

from files import _JSON_TYPES

LMDB_FORMAT = "segvlm-phrasecut"

LMDB_VERSION = 2  # 2: task "image_info" and the header's name_att_rel_count, for the subsets



_READERS = {}  # (st_dev, st_ino) -> (owner, lmdb.Environment); py-lmdb allows one per file per process



def reader(path):
    """This process's read-only environment for `path`, opened on first use. A forked DataLoader
    worker inherits its parent's environment, which LMDB must not use across fork: it is closed in
    the child (the parent's stays open) and a fresh one opened, so workers never share one. On opening,
    a file shorter than the pages LMDB's own first page counts is refused as truncated."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise FileNotFoundError(f"no LMDB file at {path}") from err
    key, owner = (st.st_dev, st.st_ino), (os.getpid(), st.st_size, st.st_mtime_ns)
    old_owner, env = _READERS.get(key, (None, None))
    if old_owner != owner:  # first use, a forked child, or a rebuilt file that reuses the inode
        if env is not None:
            env.close()
            del _READERS[key]  # so that a failed reopen below leaves no closed environment behind
        try:
            env = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                            readahead=False, meminit=False)
        except lmdb.Error as err:
            raise ValueError(f"{path} is not a readable LMDB file{' (it is empty)' if not st.st_size else ''}: "
                             f"{err}") from err
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # from the header page, read safely
        if st.st_size < need:  # reading a page past the end of the mapped file would be a bus error
            env.close()
            raise ValueError(f"{path} is truncated: {st.st_size:,} bytes, but its LMDB pages take {need:,}; "
                             "copy it again or rebuild it with `python data.py build`")
        _READERS[key] = (owner, env)
    return env



def read_record(path, key, raw):
    """An LMDB value decoded as a JSON object; a ValueError naming the file and the key otherwise."""
    try:
        record = json.loads(raw)  # TypeError when absent (None); ValueError when not UTF-8 JSON
        problem = None if isinstance(record, dict) else f"corrupt (a JSON {_JSON_TYPES.get(type(record))})"
    except (TypeError, ValueError) as err:
        problem = "missing" if raw is None else f"corrupt ({err})"
    if problem:
        raise ValueError(f"{path}: record {key.decode()} is {problem}; rebuild it with `python data.py build`")
    return record
