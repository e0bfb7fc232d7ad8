from __future__ import annotations

from agentd.tools.source import collect_sources, sources_digest


def test_builtins_are_always_included(tmp_path):
    names = [s.module for s in collect_sources(None)]
    assert "agentd_builtin_tools.calc" in names
    assert "agentd_builtin_tools.text" in names
    assert collect_sources(tmp_path / "missing") == collect_sources(None)


def test_plugin_files_get_safe_module_names(tmp_path):
    (tmp_path / "my-tool.py").write_text("def f(): pass\n")
    (tmp_path / "9lives.py").write_text("def g(): pass\n")
    (tmp_path / "_private.py").write_text("def h(): pass\n")
    plugin = [s for s in collect_sources(tmp_path) if s.module.startswith("agentd_plugin_tools")]
    assert [s.module for s in plugin] == [
        "agentd_plugin_tools._9lives",
        "agentd_plugin_tools.my_tool",
    ]
    assert [s.file for s in plugin] == ["tools/9lives.py", "tools/my-tool.py"]


def test_digest_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "t.py").write_text("def t(): return 1\n")
    (b / "t.py").write_text("def t(): return 1\n")
    assert sources_digest(collect_sources(a)) == sources_digest(collect_sources(b))
    (b / "t.py").write_text("def t(): return 2\n")
    assert sources_digest(collect_sources(a)) != sources_digest(collect_sources(b))
    assert sources_digest(collect_sources(a)) != sources_digest(collect_sources(None))
