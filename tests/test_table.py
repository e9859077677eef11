"""benchmarks/table.py: the committed docs are what it renders from benchmarks/results/ now, so
neither can go stale without the other; result kinds it does not know still render."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "benchmarks" / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_benchmarks_md_is_rendered_from_the_results():
    t = _table()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == t.render_doc(), \
        "docs/benchmarks.md is stale: run `python benchmarks/table.py --write`"


def test_readme_table_is_rendered_from_the_results():
    t = _table()
    text = (ROOT / "README.md").read_text()
    assert t.README_BEGIN.search(text), "README.md has no table.py marker"
    assert t.render_readme(text) == text, "README.md's benchmark table is stale: run `python benchmarks/table.py --write`"


def test_every_result_file_is_rendered():
    t = _table()
    doc = t.render_doc()
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"`{p.name}`" in doc
        assert "not rendered" not in t.render_file(p), p.name


def test_unknown_kinds_render_generically(tmp_path, monkeypatch):
    t = _table()
    rows = {"device": "cpu", "date": "2030-01-01", "git_commit": "abc1234", "notes": "a | b",
            "results": [{"name": "x", "ms": 1.5, "nested": {"a": 1}}, {"name": "y", "ms": 2.0}]}
    flat = {"device": "cpu", "git_commit": "abc1234", "results": {"steady": {"images_per_s": 3.25}, "list": [1]}}
    odd = {"device": "cpu", "results": 7}
    for name, d in {"newkind-a.json": rows, "newkind-b.json": flat, "newkind-c.json": odd}.items():
        (tmp_path / name).write_text(json.dumps(d))
    monkeypatch.setattr(t, "RESULTS", tmp_path)
    doc = t.render_doc()
    assert "## newkind (rendered generically)" in doc
    assert "| name | ms |" in doc and "| x | 1.5 |" in doc and "| y | 2 |" in doc and "nested" not in doc
    assert "| steady.images_per_s | 3.25 |" in doc
    assert "`newkind-c.json`" in doc and "commit abc1234" in doc
    assert doc.index("newkind-a.json") < doc.index("newkind-b.json")  # the dated run first


def test_a_known_kind_with_unexpected_fields_is_named_not_fatal(tmp_path):
    t = _table()
    p = tmp_path / "kernels-new.json"
    p.write_text(json.dumps({"device": "cpu", "git_commit": "abc1234", "results": [{"name": "x"}]}))
    out = t.render_file(p)
    assert "not rendered" in out and "kernels-new.json" in out
