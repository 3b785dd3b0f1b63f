import sqlite3

from stepdistill.store import AnnotationStore, annotation_key


def test_key_depends_on_everything_that_determines_the_output():
    ident = {"kind": "hf", "model": "m", "sampling": {"temperature": 0.0}}
    k = annotation_key(ident, "prompt", "1")
    assert k == annotation_key(dict(reversed(list(ident.items()))), "prompt", "1")  # order-free
    assert k != annotation_key({**ident, "model": "m2"}, "prompt", "1")
    assert k != annotation_key({**ident, "sampling": {"temperature": 0.7}}, "prompt", "1")
    assert k != annotation_key(ident, "prompt ", "1")
    assert k != annotation_key(ident, "prompt", "2")


def test_key_is_the_hash_of_the_canonical_json_stores_were_written_with():
    import hashlib
    import json

    ident = {"kind": "hf", "model": "m", "sampling": {"temperature": 0.7}, "stop": ["\n\nQ:"]}
    prompt = 'Q: "quoted" \u00e9 caf\u00e9\nA:'
    for sample in (0, 3):
        fields = {"teacher": ident, "prompt": prompt, "template": "2"} | ({"sample": sample} if sample else {})
        expected = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        assert annotation_key(ident, prompt, "2", sample) == expected
    assert annotation_key(ident, prompt, "2", 1) != annotation_key(ident, prompt, "2", 2)


def test_records_survive_reopening_and_are_committed_one_by_one(tmp_path):
    path = tmp_path / "a.sqlite"
    store = AnnotationStore(path)
    store.put("k1", {"kind": "x"}, "p1", "c1", completion_tokens=3, seconds=0.5)
    # Another connection sees the record before the store is closed: it was committed.
    other = sqlite3.connect(path)
    assert other.execute("SELECT completion FROM completions WHERE key='k1'").fetchone() == ("c1",)
    store.close()
    store = AnnotationStore(path)
    got = store.get_many(["k1", "missing"])
    assert set(got) == {"k1"} and got["k1"].completion == "c1" and got["k1"].completion_tokens == 3
    assert len(store) == 1


def test_get_many_handles_more_keys_than_sqlite_parameters(tmp_path):
    store = AnnotationStore(tmp_path / "a.sqlite")
    for i in range(1200):
        store.put(f"k{i}", {}, "p", f"c{i}")
    got = store.get_many([f"k{i}" for i in range(1300)])
    assert len(got) == 1200 and got["k1199"].completion == "c1199"


def _open_when_told(path, go):
    go.wait()
    AnnotationStore(path)


def test_processes_opening_one_new_store_at_once_all_succeed(tmp_path):
    """Opening a new store switches it to WAL and creates its tables; SQLite answers some of
    those races "database is locked" at once, without its busy timeout (CI saw it)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(8):
        go = ctx.Event()
        path = tmp_path / f"store{round_}.sqlite"
        procs = [ctx.Process(target=_open_when_told, args=(path, go)) for _ in range(6)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
